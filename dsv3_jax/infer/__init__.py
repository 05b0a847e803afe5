"""Inference: batched generation over the latent cache (`generate`), MTP speculative decoding
(`speculative`), the prefill pass (`prefill`) and sampling controls (`sampling`)."""
