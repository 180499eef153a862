"""Model adapter over diffusers/transformers Qwen-Image style pipeline directories."""
