"""Training: data preparation, tokenizer training, pretraining, SFT (full or LoRA), DPO and export.

Every command trains kataru's own `Transformer` (LLaMA-family config) and saves Hugging Face folders,
so what it trains is served by kataru and loads in transformers alike.
"""
