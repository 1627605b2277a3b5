"""Online methods: the policy samples during training (GRPO, SPO, DRaFT). See sampler.py; the engine's
documentation lands here with rollout.py."""
