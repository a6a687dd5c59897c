"""Synthetic-data generation: SoftSRV's soft prompts steer a frozen LM to write examples like a target set.

``soft_prompts`` holds the parameterisations P_θ(z) (non-contextual, mixture, MLP-contextual), ``embedders`` the frozen
lossy context embedder E, and ``softsrv`` the reconstruction loss and the sampler (arXiv 2410.16534).
"""

from effml.synth.embedders import HashedNgramEmbedder
from effml.synth.soft_prompts import (SOFT_PROMPTS, ContextualMLPPrompt, MixturePrompt, NonContextualPrompt, SoftPrompt,
                                      embedding_rows_init, make_soft_prompt)
from effml.synth.softsrv import cut_at_stop, generate_synthetic, pad_examples, prefixed_logits, reconstruction_loss

__all__ = ["HashedNgramEmbedder", "SoftPrompt", "NonContextualPrompt", "MixturePrompt", "ContextualMLPPrompt",
           "SOFT_PROMPTS", "make_soft_prompt", "embedding_rows_init", "prefixed_logits", "reconstruction_loss",
           "generate_synthetic", "pad_examples", "cut_at_stop"]
