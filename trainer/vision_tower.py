"""The frozen vision tower: an open_clip ViT (loaded by `filters.clip_loader`) that turns images
into patch tokens from the penultimate block, without the CLS token — LLaVA's
`mm_vision_select_layer -2` — shape [B, N_patches, D_vision].
"""
from __future__ import annotations

import torch
from torch import nn

from filters.clip_loader import load_clip
from schemas.config import ClipConfig
from schemas.errors import UserError


class VisionTower(nn.Module):
    """Never trains: parameters frozen, always in eval mode, run without autograd."""

    def __init__(self, visual: nn.Module, preprocess, select_layer: int = -2):
        super().__init__()
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise UserError(f"The CLIP vision tower {type(visual).__name__} is not a ViT; use an open_clip ViT model "
                            f"(e.g. ViT-B-32) for the trainer.")
        self.visual = visual.requires_grad_(False).eval()
        self.preprocess = preprocess  # PIL image -> [3, H, W]
        depth = len(visual.transformer.resblocks)
        # hidden states are [embeddings, block 1 .. block L]; select_layer indexes them from the end as in LLaVA
        self.hidden_index = depth + 1 + select_layer
        if self.hidden_index < 0:
            raise UserError(f"model.vision_select_layer={select_layer} is deeper than the CLIP's {depth} blocks; "
                            f"use a value in -1..-{depth + 1}.")
        grid = visual.grid_size
        self.num_patches = grid[0] * grid[1]
        self.hidden_size = visual.transformer.width
        self.image_size = visual.image_size

    @classmethod
    def from_config(cls, clip: ClipConfig, select_layer: int = -2) -> "VisionTower":
        loaded = load_clip(clip.model_copy(update={"device": "cpu"}))  # the trainer moves the whole VLM later
        return cls(loaded.model.visual, loaded.preprocess, select_layer)

    def train(self, mode: bool = True) -> "VisionTower":
        return super().train(False)  # frozen: dropout / patch dropout stay off whatever the VLM's mode

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N_patches, D_vision]."""
        if pixel_values.shape[0] == 0:  # a batch of text-only samples; open_clip cannot reshape an empty batch
            return pixel_values.new_zeros(0, self.num_patches, self.hidden_size)  # [0, N_patches, D_vision]
        if self.hidden_index == 0:  # the block input itself (a one-block tower with layer -2)
            hidden = self.visual._embeds(pixel_values)  # [B, 1 + N_patches, D_vision]
            return hidden[:, 1:]  # [B, N_patches, D_vision]
        out = self.visual.forward_intermediates(pixel_values, indices=[self.hidden_index - 1], stop_early=True,
                                                intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]  # [B, N_patches, D_vision], CLS already split off
