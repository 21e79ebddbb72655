"""Models: loading and building, SFT, generation (transformers and vLLM), the reward model and the contrastive pair."""
