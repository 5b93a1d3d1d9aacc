"""The VLM only joins the parts: image patch tokens, projected, are written into the token embeddings
wherever the (already expanded) `<image>` token stands — one masked scatter, 0..N images per sample.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.language_model import pad_token_id
from trainer.projector import build_projector
from trainer.vision_tower import VisionTower


class VisionLanguageModel(nn.Module):
    def __init__(self, vision_tower: VisionTower, language_model: nn.Module, tokenizer, image_token_id: int,
                 projector: str = "mlp2x_gelu"):
        super().__init__()
        self.vision_tower = vision_tower
        self.language_model = language_model
        d_lm = language_model.get_input_embeddings().embedding_dim
        self.projector = build_projector(projector, vision_tower.hidden_size, d_lm)
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id

    @property
    def num_patches(self) -> int:
        return self.vision_tower.num_patches

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] with N_patches `<image>` ids per image; pixel_values [M, 3, H, W], the batch's images
        in reading order (sample 0's first). Returns [B, T, D_lm]."""
        image_mask = input_ids == self.image_token_id  # [B, T]
        text_ids = input_ids.masked_fill(image_mask, 0)  # [B, T]: placeholder rows are overwritten below
        embeds = self.language_model.get_input_embeddings()(text_ids)  # [B, T, D_lm]
        patches = self.vision_tower(pixel_values)  # [M, N_patches, D_vision]
        features = self.projector(patches)  # [M, N_patches, D_lm]
        if int(image_mask.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"{int(image_mask.sum())} image positions in the ids but {features.shape[0]} images x "
                             f"{features.shape[1]} patches; expand each <image> with ConversationEncoder")
        # masked_scatter fills positions in row-major order: image m's patches land on its own placeholders
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))  # [B, T, D_lm]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                labels: torch.Tensor | None = None):
        """The LM's output (loss = mean next-token cross-entropy over labels != IGNORE)."""
        embeds = self.embed(input_ids, pixel_values)  # [B, T, D_lm]
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                 **generate_kwargs) -> torch.Tensor:
        """New token ids [B, T_new] after prompts from ConversationEncoder.encode_prompt, batched with
        Collate(pad_left=True) (the evals' path: POPE, QA)."""
        embeds = self.embed(input_ids, pixel_values)  # [B, T, D_lm]
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                            pad_token_id=pad_token_id(self.tokenizer),
                                            **generate_kwargs)
