"""``effml bench padir``: parallel decoding by iterative refinement against autoregressive decoding as the targets
grow, and against x-transformers' ``NonAutoregressiveWrapper``.

Per target length T (sources as long) and batch size B, on random weights (decoding time depends on the shapes, not
on what a model learned), contenders timed interleaved in balanced rounds (``time_interleaved``), each encoding the
source inside the timed call:

* ``ar`` — effml's ``EncoderDecoder`` with a causal decoder, greedy decoding of T tokens with its KV cache
  (``decode_autoregressive``). The EOS row of its tied embedding is zeroed: EOS's logit is then 0 while the largest
  of the other logits is positive, so every row runs to T tokens (checked before timing), as a trained model's would
  on a T-token target;
* ``effml@N`` — effml's ``EncoderDecoder`` with a non-causal decoder: ``refine_decode`` in N passes from all-[MASK]
  at length T (given, so that every source has the same canvas: the length predictor's proposal, one small matmul
  on the encoded [LENGTH] position, is not timed), linear re-masking, the argmax at every pass;
* ``x-transformers@N`` — ``NonAutoregressiveWrapper.generate`` with ``steps=N`` (its MaskGIT-style loop: top-k
  filtering to 30 % of the vocabulary, Gumbel sampling, linear schedule: sampling work effml's argmax does not do,
  which weighs most where the vocabulary is large against the model) around a ``TransformerWrapper`` whose
  ``Encoder`` layers cross-attend to an x-transformers ``Encoder``'s embedding of the source: the same width, depth,
  heads and feed-forward size, one token embedding for both and the output head (effml's model ties them too; the
  parameter counts are reported).

Training, at each T and batch ``train_batch_size``: one single-stage step (forward, loss, backward, AdamW) of PaDIR's
objective on a corrupted batch (``effml.experiments.padir.seq2seq_loss``: cross-entropy on every target position plus
the length loss; the corruption is drawn once, outside the timed step) against the ``NonAutoregressiveWrapper``'s own
masked loss (its masking inside the step).

Ratios: ``speedup@N_T{T}_b{B}`` = ar ÷ effml@N time (PaDIR's 2–3× claim; PAPERS.md §9(d) expects the speed-up to grow
with T); ``effml_vs_xtransformers@N_T{T}_b{B}`` = effml@N ÷ x-transformers@N time and ``train_vs_xtransformers_T{T}``
(both: lower is better). Each carries its per-round spread.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effml.benchmarks.common import (format_ratio, machine_info, markdown_table, missing_peer_note,
                                     paired_time_ratios, ratio_entry, time_interleaved)

__all__ = ["PadirBenchConfig", "DEFAULT", "GPU", "QUICK", "run", "render"]

PAD, BOS, EOS, MASK, LENGTH = 0, 1, 2, 3, 4
N_SPECIAL = 5
AR, PEER = "ar", "x-transformers"


@dataclass(frozen=True)
class PadirBenchConfig:
    """Shapes and repeat counts: encoder-decoders of ``d_model``, ``n_heads`` and ``layers`` encoder and decoder
    layers over ``vocab_size`` ids; every T in ``target_lengths`` × B in ``batch_sizes`` × N in ``passes``."""

    d_model: int
    n_heads: int
    layers: int
    vocab_size: int
    target_lengths: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    passes: tuple[int, ...]
    train_batch_size: int
    repeats: int
    warmup: int
    seed: int = 0


# DEFAULT: the width and depth of the README's padir run on real text (d=128, 3+3 layers, 4,000 BPE ids)
DEFAULT = PadirBenchConfig(d_model=128, n_heads=4, layers=3, vocab_size=4000, target_lengths=(16, 32, 64, 128),
                           batch_sizes=(1, 32), passes=(1, 2, 4, 8), train_batch_size=32, repeats=10, warmup=1)
GPU = PadirBenchConfig(d_model=512, n_heads=8, layers=6, vocab_size=8000, target_lengths=(16, 32, 64, 128, 256),
                       batch_sizes=(1, 128), passes=(1, 2, 4, 8), train_batch_size=128, repeats=20, warmup=2)
QUICK = PadirBenchConfig(d_model=32, n_heads=2, layers=1, vocab_size=64, target_lengths=(4, 8), batch_sizes=(1, 2),
                         passes=(1, 2), train_batch_size=4, repeats=2, warmup=1)


def effml_model(config: PadirBenchConfig, target_length: int, causal: bool) -> nn.Module:
    """effml's encoder-decoder for T = ``target_length``: causal (AR; its EOS logit pinned to 0, see the module
    docstring) or non-causal with a length predictor, learned absolute positions either way (as in the recipe)."""
    from effml.nn import EncoderDecoder, EncoderDecoderConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = EncoderDecoder(EncoderDecoderConfig(
            vocab_size=config.vocab_size, d_model=config.d_model, n_heads=config.n_heads,
            n_encoder_layers=config.layers, n_decoder_layers=config.layers, max_source_len=target_length,
            max_target_len=target_length + 1, causal_decoder=causal, length_classes=0 if causal else target_length + 1,
            absolute_positions=True))
    if causal:
        with torch.no_grad():
            model.tok_emb.weight[EOS] = 0.0
    return model.eval()


class PeerSeq2Seq(nn.Module):
    """x-transformers' counterpart: an ``Encoder`` over the source and a ``NonAutoregressiveWrapper`` around a
    cross-attending ``Encoder`` stack over the target (raises ImportError without x-transformers)."""

    def __init__(self, config: PadirBenchConfig, target_length: int) -> None:
        from x_transformers import Encoder, NonAutoregressiveWrapper, TransformerWrapper

        super().__init__()
        shape = {"dim": config.d_model, "depth": config.layers, "heads": config.n_heads,
                 "attn_dim_head": config.d_model // config.n_heads}
        # one token embedding for source, target and output head, as effml's model has
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.encoder = TransformerWrapper(num_tokens=config.vocab_size, max_seq_len=target_length,
                                              attn_layers=Encoder(**shape), return_only_embed=True)
            decoder = TransformerWrapper(num_tokens=config.vocab_size, max_seq_len=target_length,
                                         attn_layers=Encoder(**shape, cross_attend=True),
                                         token_emb=self.encoder.token_emb, tie_embedding=True)
        self.wrapper = NonAutoregressiveWrapper(decoder, mask_id=MASK)

    def context(self, source: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoder's cross-attention arguments for ``source`` (B, S)."""
        keep = source.ne(PAD)
        return {"context": self.encoder(source, mask=keep, return_embeddings=True), "context_mask": keep}

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The wrapper's masked training loss of ``target`` (B, T) given ``source`` (B, S)."""
        return self.wrapper(target, **self.context(source)).loss

    @torch.no_grad()
    def generate(self, source: torch.Tensor, passes: int) -> torch.Tensor:
        """(B, T) ids generated in ``passes`` steps."""
        self.wrapper.steps = passes
        return self.wrapper.generate(batch_size=source.shape[0], **self.context(source))


def _random_ids(shape: tuple[int, ...], vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(N_SPECIAL, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _decoders(config: PadirBenchConfig, target_length: int, batch_size: int, device: str,
              skipped: dict[str, str]) -> dict[str, Any]:
    """The timed decoding callables at one (T, B): ``ar``, ``effml@N`` and (when installed) ``x-transformers@N``."""
    from effml.decode import decode_autoregressive, refine_decode

    source = _random_ids((batch_size, target_length), config.vocab_size, config.seed + 1).to(device)
    padding = source.eq(PAD)
    ar_model = effml_model(config, target_length, causal=True).to(device)
    nar_model = effml_model(config, target_length, causal=False).to(device)
    lengths = torch.full((batch_size,), target_length, device=device)
    specials = tuple(range(N_SPECIAL))

    def ar() -> torch.Tensor:
        return decode_autoregressive(ar_model, source, padding, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                                     max_len=target_length).lengths

    decoded = ar()
    if not bool(decoded.eq(target_length).all()):
        raise RuntimeError(f"the AR contender stopped before {target_length} tokens (lengths {decoded.tolist()}); "
                           "the benchmark times full-length targets.")
    contenders: dict[str, Any] = {AR: ar}
    for passes in config.passes:
        contenders[f"effml@{passes}"] = (
            lambda passes=passes: refine_decode(nar_model, source, padding, iterations=passes, mask_id=MASK,
                                                pad_id=PAD, lengths=lengths, suppress_ids=specials))
    try:
        peer = PeerSeq2Seq(config, target_length).to(device).eval()
    except ImportError as error:
        skipped[PEER] = missing_peer_note("x-transformers", error)
        return contenders
    for passes in config.passes:
        contenders[f"{PEER}@{passes}"] = lambda passes=passes: peer.generate(source, passes)
    return contenders


def _training_steps(config: PadirBenchConfig, target_length: int, device: str) -> tuple[dict[str, Any],
                                                                                       dict[str, int]]:
    """The timed training steps at T = ``target_length`` (effml, and x-transformers when installed), and each
    model's parameter count."""
    from effml.experiments.padir import Seq2SeqBatch, seq2seq_loss
    from effml.train.masking import corrupt_targets
    from effml.train.step_timing import TrainingStep

    batch_size = config.train_batch_size
    source = _random_ids((batch_size, target_length), config.vocab_size, config.seed + 2)
    target = _random_ids((batch_size, target_length), config.vocab_size, config.seed + 3)
    no_padding = torch.zeros(batch_size, target_length, dtype=torch.bool)
    corrupted = corrupt_targets(target, no_padding, mask_id=MASK,
                                replacement_ids=torch.arange(N_SPECIAL, config.vocab_size),
                                generator=torch.Generator().manual_seed(config.seed + 4))
    batch = Seq2SeqBatch(source, source.eq(PAD), corrupted.inputs, target, ~no_padding, no_padding,
                         torch.full((batch_size,), target_length))
    model = effml_model(config, target_length, causal=False)
    steps = {"effml": TrainingStep(model, seq2seq_loss(0.1), batch, device)}
    params = {"effml": sum(p.numel() for p in model.parameters())}
    try:
        peer = PeerSeq2Seq(config, target_length)
    except ImportError:
        return steps, params  # (the decoding part already noted the missing peer)
    steps[PEER] = TrainingStep(peer, lambda model, pair, step: (model(*pair), {}), (source, target), device)
    params[PEER] = sum(p.numel() for p in peer.parameters())
    return steps, params


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Run the benchmark (``QUICK`` shapes when ``quick``, else ``GPU`` on CUDA and ``DEFAULT`` elsewhere) and return
    the JSON-ready result: config, machine, per (T, B) each decoder's time, per T each training step's time, and
    ``ratios``."""
    config = QUICK if quick else (GPU if torch.device(device).type == "cuda" else DEFAULT)
    result: dict[str, Any] = {"benchmark": "padir", "quick": quick, "machine": machine_info(device, ["x-transformers"]),
                              "config": dataclasses.asdict(config), "decode": {}, "train": {}, "skipped": {}}
    ratios: dict[str, Any] = {}
    for length in config.target_lengths:
        for batch_size in config.batch_sizes:
            key = f"T{length}_b{batch_size}"
            contenders = _decoders(config, length, batch_size, device, result["skipped"])
            timings = time_interleaved(contenders, repeats=config.repeats, warmup=config.warmup, device=device)
            times = result["decode"][key] = {name: timing.as_dict() for name, timing in timings.items()}
            for passes in config.passes:
                ratios[f"speedup@{passes}_{key}"] = ratio_entry(
                    result, ("decode", key, AR, "median_s"), ("decode", key, f"effml@{passes}", "median_s"),
                    better="higher", per_round=paired_time_ratios(times[AR]["samples_s"],
                                                                  times[f"effml@{passes}"]["samples_s"]))
                if f"{PEER}@{passes}" in times:
                    ratios[f"effml_vs_xtransformers@{passes}_{key}"] = ratio_entry(
                        result, ("decode", key, f"effml@{passes}", "median_s"),
                        ("decode", key, f"{PEER}@{passes}", "median_s"), better="lower",
                        per_round=paired_time_ratios(times[f"effml@{passes}"]["samples_s"],
                                                     times[f"{PEER}@{passes}"]["samples_s"]))
        steps, params = _training_steps(config, length, device)
        timings = time_interleaved(steps, repeats=config.repeats, warmup=config.warmup, device=device)
        times = result["train"][f"T{length}"] = {name: {**timing.as_dict(), "params": params[name]}
                                                 for name, timing in timings.items()}
        if PEER in times:
            ratios[f"train_vs_xtransformers_T{length}"] = ratio_entry(
                result, ("train", f"T{length}", "effml", "median_s"), ("train", f"T{length}", PEER, "median_s"),
                better="lower", per_round=paired_time_ratios(times["effml"]["samples_s"], times[PEER]["samples_s"]))
    result["ratios"] = ratios
    return result


def render(result: dict[str, Any]) -> str:
    """Markdown: per (T, B) the AR time and each pass count's time, speed-up over AR and ratio to x-transformers;
    per T the training steps."""
    config, ratios = result["config"], result["ratios"]
    rows = []
    for key, times in result["decode"].items():
        for passes in config["passes"]:
            peer = ratios.get(f"effml_vs_xtransformers@{passes}_{key}")
            rows.append([key.replace("_b", ", B "), passes, f"{times[AR]['median_s'] * 1e3:.1f}",
                         f"{times[f'effml@{passes}']['median_s'] * 1e3:.1f}",
                         format_ratio(ratios[f"speedup@{passes}_{key}"]),
                         "not measured" if peer is None else format_ratio(peer)])
    text = "## Decoding: AR against N parallel passes\n\n" + markdown_table(
        ["T, batch", "passes N", "AR (ms)", "effml N passes (ms)", "speed-up over AR",
         "effml ÷ x-transformers"], rows) + "\n"
    train_rows = [[key, f"{times['effml']['median_s'] * 1e3:.1f}",
                   f"{times[PEER]['median_s'] * 1e3:.1f}" if PEER in times else "not measured",
                   format_ratio(ratios[f"train_vs_xtransformers_{key}"]) if PEER in times else "—",
                   ", ".join(f"{name} {entry['params']:,}" for name, entry in times.items())]
                  for key, times in result["train"].items()]
    text += "\n## A training step\n\n" + markdown_table(
        ["T", "effml (ms)", "x-transformers (ms)", "effml ÷ x-transformers", "parameters"], train_rows) + "\n"
    for peer, note in result["skipped"].items():
        text += f"\n{peer}: {note}\n"
    return text
