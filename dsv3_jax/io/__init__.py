"""Files in and out: Hugging Face checkpoints (`hf`) and our safetensors reader and writer
(`safetensors`)."""
