r"""LLaVA-style VLM training: a frozen open_clip vision tower, a projector and a causal LM.

    python pipelines/train.py --stage align --data llava.json --image-folder images/ --out outputs/train/align
    python pipelines/train.py --stage finetune --data instruct.json --image-folder images/ \
        --init outputs/train/align --out outputs/train/finetune

One file per part: `vision_tower`, `projector`, `language_model`, `vlm` (joins them),
`conversation` (tokens and loss mask), `stages` (what trains), `data`, `checkpoint`, `train`.
"""
