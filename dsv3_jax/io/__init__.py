"""Files in and out: Hugging Face checkpoints (`hf`), our safetensors reader and writer
(`safetensors`), tokenizers (`tokenizer`: the byte tokenizer and Hugging Face tokenizer.json)
and chat templates (`chat`)."""
