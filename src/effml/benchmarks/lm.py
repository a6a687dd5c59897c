"""``effml bench lm``: effml's ``TransformerLM`` against x-transformers and Hugging Face GPT-2, same shapes, same run.

Measured, all in one process (memory: one fresh subprocess per contender, see ``effml.benchmarks.common``):

1. Training throughput, tokens/s of a full step — forward, cross-entropy, backward, ``torch.optim.AdamW`` step — on
   the same random batch, with the same optimizer settings and torch threads, contenders interleaved in balanced rounds.
2. Peak memory of a training step (beyond the built model and batch).
3. Greedy generation tokens/s with a KV cache: ``effml.decode.generate`` vs ``GPT2LMHeadModel.generate``
   (use_cache=True), same prompt length and number of new tokens, at each batch size of the config.
4. Model FLOPs utilisation of effml's training step: ``flops_per_token(T)`` × tokens/s ÷ measured matmul FLOP/s
   (a 2048³ float32 matmul timed in the same interleaved rounds as the training steps).

Every ratio is effml ÷ peer, computed from the absolute numbers stored next to it. The targets (effml ≥ 1.0×
x-transformers training tokens/s on CPU; effml ≥ 1.0× HF generation tokens/s) are evaluated from the measurement.

Peers are configured as close to effml's architecture (pre-norm RMSNorm, rotary over the whole head, SDPA, exact-GELU
MLP of width 4·d, no biases, tied embeddings) as their options allow; ``differences(config)`` lists what remains.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.benchmarks.common import (format_bytes, format_rate, format_ratio, get_path, machine_info, markdown_table,
                                     matmul_peak_summary, matmul_workload, missing_peer_note, paired_rate_ratios,
                                     peak_memory, ratio_entry, time_interleaved, verdict)

__all__ = ["LMBenchConfig", "DEFAULT", "QUICK", "CONTENDERS", "differences", "TrainStep", "build_model",
           "train_step_factory", "generate_factory", "run", "render"]

EFFML, XT, HF = "effml", "x-transformers", "hf-gpt2"
MATMUL = "matmul-peak"  # the machine's matmul, timed in the training rounds
_WORK = "work_tokens"  # tokens processed by one timed call (a training step, or a generation's new tokens)
TARGET = 1.0  # every target: effml at least as fast as the peer
CONTENDERS = (EFFML, XT, HF)
PEER_PACKAGES = {XT: "x-transformers", HF: "transformers"}



@dataclass(frozen=True)
class LMBenchConfig:
    """Shapes and repeat counts of the ``lm`` benchmark.

    Attributes:
        vocab_size, d_model, n_layers, n_heads, context, batch_size: model and training-batch shape (context = T).
        lr, weight_decay: AdamW settings, identical for every contender.
        train_warmup, train_repeats: untimed and timed (interleaved) training steps per contender.
        memory_steps: training steps run while measuring peak memory.
        prompt_len, new_tokens, gen_batch_sizes: greedy generation shape (one measurement per batch size).
        gen_warmup, gen_repeats: untimed and timed generations per contender and batch size.
        matmul_size: the square float32 matmul timed (interleaved with the training steps) for the machine's peak.
        seed: weights and batches.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    context: int = 256
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.1
    train_warmup: int = 2
    train_repeats: int = 12
    memory_steps: int = 2
    prompt_len: int = 16
    new_tokens: int = 128
    gen_batch_sizes: tuple[int, ...] = (1, 16)
    gen_warmup: int = 1
    gen_repeats: int = 10
    matmul_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values = value if field.name == "gen_batch_sizes" else (value,)
            if field.name == "gen_batch_sizes" and not values:
                raise ValueError("LMBenchConfig.gen_batch_sizes must name at least one batch size.")
            for item in values:
                if isinstance(item, bool) or not isinstance(item, (int, float)) or item < 0:
                    raise ValueError(f"LMBenchConfig.{field.name} must be non-negative numbers, got {value!r}.")
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise ValueError(f"LMBenchConfig: d_model {self.d_model} must be split into n_heads {self.n_heads} equal "
                             "heads; give n_heads ≥ 1 dividing d_model.")
        if self.prompt_len + self.new_tokens > self.context:
            raise ValueError(f"LMBenchConfig: prompt_len + new_tokens = {self.prompt_len + self.new_tokens} exceeds "
                             f"the context {self.context}; every model is built with max_seq_len = context.")

    @property
    def head_dim(self) -> int:
        """Channels per attention head, d_model / n_heads (rotary covers all of them in every contender)."""
        return self.d_model // self.n_heads

    def shape(self) -> dict[str, int]:
        """The model shape as JSON-ready keyword arguments of ``build_model``."""
        return {"vocab_size": self.vocab_size, "d_model": self.d_model, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "context": self.context}


def differences(config: LMBenchConfig) -> dict[str, str]:
    """Each contender's remaining differences from effml's architecture (one sentence each), stated for ``config``'s
    shape, so that the report describes the models it measured (e.g. the head size d_model / n_heads)."""
    head_dim = config.head_dim
    return {
        EFFML: f"reference: pre-norm RMSNorm (fused F.rms_norm), rotary (rotate-half) on all {head_dim} head dims, "
               "fused q/k/v projection, SDPA causal attention, exact-GELU MLP (4·d), no biases, tied embeddings.",
        XT: "separate q, k, v projections (3 matmuls instead of 1 fused); RMSNorm as F.normalize(x)·√d·g (unfused, "
            "no eps); interleaved-pair rotary (a feature permutation of rotate-half); tied head computed as "
            "x @ Eᵀ then multiplied by tie_embedding_scale=1.0; default nn.Linear init. Otherwise the same: pre-norm, "
            f"rotary on all {head_dim} head dims, SDPA (attn_flash), exact GELU, width 4·d, no biases, no absolute "
            "positions.",
        HF: "GPT-2 architecture: learned absolute position embeddings (+max_seq_len·d parameters), LayerNorm with "
            "bias instead of RMSNorm, biases on every projection, no rotary; fused q/k/v (Conv1D/addmm); "
            "dropouts set to 0 and activation set to exact GELU to match effml; SDPA attention; tied embeddings.",
    }


DEFAULT = LMBenchConfig()
QUICK = LMBenchConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, context=32, batch_size=2, train_warmup=1,
                      train_repeats=2, memory_steps=1, prompt_len=4, new_tokens=8, gen_batch_sizes=(1, 2),
                      gen_warmup=1, gen_repeats=1, matmul_size=256)


# ---------------------------------------------------------------------------------------------------- models


def build_model(contender: str, shape: dict[str, int]) -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    """Build one contender's LM of the given ``shape`` (keys of ``LMBenchConfig.shape``) on CPU.

    Returns ``(model, logits_fn)`` where ``logits_fn(model, idx (B, T)) -> logits (B, T, V)``. Raises ImportError
    when a peer package is missing and ValueError for an unknown contender.
    """
    vocab, d, layers, heads, context = (shape[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "context"))
    if contender == EFFML:
        from effml.nn import TransformerConfig, TransformerLM

        config = TransformerConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, max_seq_len=context,
                                   mlp="gelu")
        return TransformerLM(config), lambda model, idx: model(idx)
    if contender == XT:
        from x_transformers import Decoder, TransformerWrapper

        model = TransformerWrapper(
            num_tokens=vocab, max_seq_len=context, use_abs_pos_emb=False, tie_embedding=True, tie_embedding_scale=1.0,
            attn_layers=Decoder(dim=d, depth=layers, heads=heads, attn_dim_head=d // heads, rotary_pos_emb=True,
                                rotary_emb_dim=d // heads, use_rmsnorm=True, attn_flash=True, ff_mult=4,
                                ff_no_bias=True))
        return model, lambda model, idx: model(idx)
    if contender == HF:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=d, n_layer=layers, n_head=heads, n_positions=context, vocab_size=vocab,
                            activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=None, eos_token_id=None, tie_word_embeddings=True,
                            attn_implementation="sdpa")
        return GPT2LMHeadModel(config), lambda model, idx: model(input_ids=idx, use_cache=False).logits
    raise ValueError(f"unknown contender {contender!r}; choose one of {list(CONTENDERS)}.")


def _random_tokens(batch: int, length: int, vocab: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


class TrainStep:
    """One training step of a contender, callable: forward, cross-entropy, backward, AdamW step.

    Attributes: model, optimizer, inputs/targets (B, T) on the device, ``params`` (parameter count, tied weights
    counted once).
    """

    def __init__(self, contender: str, shape: dict[str, int], batch_size: int, lr: float, weight_decay: float,
                 device: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.model, self._logits = build_model(contender, shape)
        self.model.to(device).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        tokens = _random_tokens(batch_size, shape["context"] + 1, shape["vocab_size"], seed + 1).to(device)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]

    def __call__(self) -> Tensor:
        """Run one step; returns the detached loss (not read back, so no device sync is forced here)."""
        logits = self._logits(self.model, self.inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def train_step_factory(contender: str, shape: dict[str, int], batch_size: int, lr: float, weight_decay: float,
                       device: str, seed: int) -> TrainStep:
    """A ready ``TrainStep`` (module-level, JSON-serialisable arguments, so memory subprocesses can build it)."""
    return TrainStep(contender, shape, batch_size, lr, weight_decay, device, seed)


def generate_factory(contender: str, shape: dict[str, int], batch_size: int, prompt_len: int, new_tokens: int,
                     device: str, seed: int) -> Callable[[], Tensor]:
    """A zero-argument callable that greedily generates ``new_tokens`` after a random (batch_size, prompt_len)
    prompt with a KV cache and returns the (batch_size, prompt_len + new_tokens) tokens. effml and hf-gpt2 only."""
    if contender not in (EFFML, HF):
        raise ValueError(f"generation is benchmarked for {EFFML!r} and {HF!r}, not {contender!r}.")
    torch.manual_seed(seed)
    model, _ = build_model(contender, shape)
    model.to(device).eval()
    prompt = _random_tokens(batch_size, prompt_len, shape["vocab_size"], seed + 2).to(device)
    if contender == EFFML:
        from effml.decode import generate

        def run_generation() -> Tensor:
            return generate(model, prompt, new_tokens, temperature=0.0)  # runs under torch.inference_mode
    else:
        attention_mask = torch.ones_like(prompt)

        def run_generation() -> Tensor:
            # inference_mode as in effml.decode.generate; no EOS token is configured, so all new_tokens are produced
            with torch.inference_mode(), _quiet_transformers():
                return model.generate(prompt, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                      do_sample=False, use_cache=True)
    return run_generation


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-call generation notices for the duration of the block (restoring the level)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------- the run


def _available(contenders: tuple[str, ...], builder: Callable[[str], Any], skipped: dict[str, str],
               optional: dict[str, str]) -> dict[str, Any]:
    """Build each contender with ``builder``. A contender named in ``optional`` (name -> the package or module it
    needs) whose import fails is recorded in ``skipped`` instead; any other error propagates."""
    built = {}
    for name in contenders:
        try:
            built[name] = builder(name)
        except ImportError as error:
            if name not in optional:
                raise
            package = optional[name]
            note = (missing_peer_note(package, error) if package in PEER_PACKAGES.values()
                    else f"skipped: {package} is not available ({type(error).__name__}: {error}).")
            skipped.setdefault(name, note)
    return built


def _measure_training(config: LMBenchConfig, device: str, result: dict[str, Any], skipped: dict[str, str]) -> None:
    kwargs = {"shape": config.shape(), "batch_size": config.batch_size, "lr": config.lr,
              "weight_decay": config.weight_decay, "device": device, "seed": config.seed}
    steps = _available(CONTENDERS, lambda name: train_step_factory(name, **kwargs), skipped, PEER_PACKAGES)
    # The matmul peak is timed in the same rounds as the steps, so that MFU compares like with like on a busy machine.
    matmul, _ = matmul_workload(device, size=config.matmul_size)
    timings = time_interleaved({**steps, MATMUL: matmul}, repeats=config.train_repeats, warmup=config.train_warmup,
                               device=device)
    peak = matmul_peak_summary(timings.pop(MATMUL), config.matmul_size)
    tokens_per_step = config.batch_size * config.context
    train = {}
    for name, timing in timings.items():
        train[name] = {"params": steps[name].params, _WORK: tokens_per_step,
                       "tokens_per_s": tokens_per_step / timing.median, **timing.as_dict()}
    result["train"] = train
    flops_per_token = steps[EFFML].model.flops_per_token(config.context)
    result["mfu"] = {"flops_per_token": flops_per_token, "tokens_per_s": train[EFFML]["tokens_per_s"],
                     "achieved_flops_per_s": flops_per_token * train[EFFML]["tokens_per_s"],
                     "matmul_peak_flops_per_s": peak["flops_per_s"], "matmul": peak}
    del steps
    factories = {name: ("effml.benchmarks.lm:train_step_factory", {"contender": name, **kwargs}) for name in train}
    result["memory"] = peak_memory(factories, device=device, steps=config.memory_steps)


def _measure_generation(config: LMBenchConfig, device: str, result: dict[str, Any],
                        skipped: dict[str, str]) -> None:
    generation = {}
    for batch in config.gen_batch_sizes:
        kwargs = {"shape": config.shape(), "batch_size": batch, "prompt_len": config.prompt_len,
                  "new_tokens": config.new_tokens, "device": device, "seed": config.seed}
        runs = _available((EFFML, HF), lambda name: generate_factory(name, **kwargs), skipped,
                          {EFFML: "effml.decode.generate", **PEER_PACKAGES})
        if not runs:
            continue
        for name, run_generation in runs.items():  # also a warm-up; guards against a peer stopping early
            produced = run_generation().shape
            if tuple(produced) != (batch, config.prompt_len + config.new_tokens):
                raise RuntimeError(f"{name} generated a {tuple(produced)} tensor, expected "
                                   f"{(batch, config.prompt_len + config.new_tokens)}; its tokens/s would be wrong.")
        timings = time_interleaved(runs, repeats=config.gen_repeats, warmup=max(0, config.gen_warmup - 1),
                                   device=device)
        new_tokens = batch * config.new_tokens
        generation[f"batch_{batch}"] = {
            name: {"batch_size": batch, _WORK: new_tokens, "tokens_per_s": new_tokens / timing.median,
                   **timing.as_dict()} for name, timing in timings.items()}
    result["generation"] = generation


def _speed_ratio(result: dict[str, Any], section: tuple[str, ...], peer: str) -> dict[str, Any]:
    """effml ÷ ``peer`` tokens/s under ``section`` (e.g. ("train",)), with the round-by-round ratios."""
    numbers = get_path(result, section)
    per_round = paired_rate_ratios(numbers[EFFML]["samples_s"], numbers[peer]["samples_s"],
                                   work_ratio=numbers[EFFML][_WORK] / numbers[peer][_WORK])
    return ratio_entry(result, (*section, EFFML, "tokens_per_s"), (*section, peer, "tokens_per_s"), better="higher",
                       per_round=per_round)


def _add_ratios(config: LMBenchConfig, device: str, result: dict[str, Any]) -> None:
    ratios: dict[str, dict[str, Any]] = {}
    train, memory, generation = result["train"], result["memory"], result["generation"]
    for peer, label in ((XT, "xtransformers"), (HF, "hf_gpt2")):
        if peer in train:
            ratios[f"train_ratio_vs_{label}"] = _speed_ratio(result, ("train",), peer)
        if peer in memory:
            ratios[f"memory_ratio_vs_{label}"] = ratio_entry(result, ("memory", EFFML, "peak_bytes"),
                                                             ("memory", peer, "peak_bytes"), better="lower",
                                                             zero_is_unmeasured=True)
    for key, contenders in generation.items():
        if EFFML in contenders and HF in contenders:
            ratios[f"generate_ratio_vs_hf_gpt2_{key}"] = _speed_ratio(result, ("generation", key), HF)
    mfu = result["mfu"]
    work = mfu["flops_per_token"] * train[EFFML][_WORK] / (2.0 * mfu["matmul"]["size"] ** 3)
    ratios["mfu"] = ratio_entry(result, ("mfu", "achieved_flops_per_s"), ("mfu", "matmul_peak_flops_per_s"),
                                better="higher", per_round=paired_rate_ratios(
                                    train[EFFML]["samples_s"], mfu["matmul"]["samples_s"], work_ratio=work))
    result["ratios"] = ratios

    on_cpu = torch.device(device).type == "cpu"
    targets = [("effml ≥ 1.0× x-transformers training tokens/s (on CPU)", "train_ratio_vs_xtransformers", on_cpu)]
    targets += [(f"effml ≥ 1.0× HF GPT-2 generation tokens/s (batch {b})", f"generate_ratio_vs_hf_gpt2_batch_{b}",
                 True) for b in config.gen_batch_sizes]
    result["targets"] = []
    for statement, ratio_name, applies in targets:
        entry = ratios.get(ratio_name)
        if not applies:
            status = "n/a (stated for CPU)"
        elif entry is None:
            status = "not measured"
        else:
            status = verdict(entry, TARGET)
        result["targets"].append({"target": statement, "ratio": ratio_name, "threshold": TARGET,
                                  "value": None if entry is None else entry["value"], "status": status})


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Run the ``lm`` benchmark (``QUICK`` shapes when ``quick``) and return the JSON-ready result dict:
    config, machine, train/memory/generation/mfu absolute numbers, ``ratios`` (effml ÷ peer) and ``targets``."""
    config = QUICK if quick else DEFAULT
    skipped: dict[str, str] = {}
    result: dict[str, Any] = {
        "benchmark": "lm", "quick": quick,
        "machine": machine_info(device, peers=("x-transformers", "transformers")),
        "config": {**dataclasses.asdict(config), "gen_batch_sizes": list(config.gen_batch_sizes),
                   "optimizer": "torch.optim.AdamW (default foreach implementation), same settings for all",
                   "loss": "F.cross_entropy over all B·T positions (same code for all)"},
        "contenders": {name: {"differences": text} for name, text in differences(config).items()},
    }
    _measure_training(config, device, result, skipped)
    _measure_generation(config, device, result, skipped)
    _add_ratios(config, device, result)
    result["skipped"] = skipped
    return result


# ---------------------------------------------------------------------------------------------------- markdown


_LABELS = {XT: "xtransformers", HF: "hf_gpt2"}
_REFERENCE = "1.00× (ref)"


def _ratio_cell(result: dict[str, Any], name: str) -> str:
    return format_ratio(result["ratios"].get(name))


def render(result: dict[str, Any]) -> str:
    """The body of the markdown report (after the machine and config header written by ``run_benchmark``)."""
    train, memory = result["train"], result["memory"]
    rows = []
    for name, numbers in train.items():
        label = _LABELS.get(name)
        rows.append([name, f"{numbers['params']:,}", f"{numbers['median_s'] * 1e3:.1f}",
                     f"{numbers['tokens_per_s']:,.0f}", format_bytes(memory.get(name, {}).get("peak_bytes")),
                     _REFERENCE if label is None else _ratio_cell(result, f"train_ratio_vs_{label}"),
                     _REFERENCE if label is None else _ratio_cell(result, f"memory_ratio_vs_{label}")])
    sections = ["## Training step (forward + cross-entropy + backward + AdamW)",
                markdown_table(["model", "params", "median step (ms)", "tokens/s", "peak step memory",
                                "effml tokens/s ÷ model's (higher = effml faster)",
                                "effml memory ÷ model's (lower = effml leaner)"], rows)]
    method = next(iter(memory.values()), {}).get("method", "–")
    sections.append("Ratios are effml ÷ peer: the quotient of the medians, then in brackets the median and range of "
                    "the round-by-round ratios (each round ran every contender once under the same machine load). "
                    f"Peak step memory: method `{method}` (see `effml.benchmarks.common`): on CPU the growth of the "
                    "resident set of a fresh process over its training steps (tensors plus allocator overhead); on "
                    "CUDA the growth of `max_memory_allocated`.")

    gen_rows = []
    for key, contenders in result["generation"].items():
        for name, numbers in contenders.items():
            gen_rows.append([numbers["batch_size"], name, f"{numbers['median_s']:.3f}",
                             f"{numbers['tokens_per_s']:,.1f}",
                             _REFERENCE if name == EFFML else _ratio_cell(result, f"generate_ratio_vs_hf_gpt2_{key}")])
    sections += ["## Greedy generation with a KV cache",
                 markdown_table(["batch", "model", "median time (s)", "new tokens/s", "effml tokens/s ÷ model's"],
                                gen_rows) if gen_rows else "Not measured."]

    mfu = result["mfu"]
    sections += ["## Model FLOPs utilisation (effml training step)",
                 markdown_table(["training FLOPs/token", "tokens/s", "achieved FLOP/s",
                                 f"measured matmul peak ({mfu['matmul']['size']}³ {mfu['matmul']['dtype']}, "
                                 "same rounds)", "MFU"],
                                [[format_rate(mfu["flops_per_token"]), f"{mfu['tokens_per_s']:,.0f}",
                                  format_rate(mfu["achieved_flops_per_s"]),
                                  format_rate(mfu["matmul_peak_flops_per_s"]) + "FLOP/s",
                                  f"{result['ratios']['mfu']['value']:.1%} (rounds: "
                                  f"{result['ratios']['mfu']['per_round']['median']:.1%})"]]),
                 "FLOPs/token: `TransformerLM.flops_per_token` (6·N + 12·L·d·T, PaLM appendix B; attention is "
                 "counted as if not causal, as is conventional)."]

    target_rows = []
    for target in result["targets"]:
        entry = result["ratios"].get(target["ratio"], {})
        rounds = entry.get("per_round")
        ahead = "–" if rounds is None else f"{rounds['rounds_at_least_1']}/{rounds['rounds']}"
        target_rows.append([target["target"], _ratio_cell(result, target["ratio"]), ahead, f"**{target['status']}**"])
    sections += ["## Targets (evaluated from this run's measurements)",
                 markdown_table(["target", "measured", "rounds with effml ≥ peer", "status"], target_rows),
                 "`inconclusive`: the quotient of medians and the median of the round-by-round ratios fall on "
                 "different sides of the threshold (the difference is within this machine's noise)."]
    sections += ["## Contenders and their remaining differences from effml",
                 markdown_table(["model", "differences"],
                                [[name, info["differences"]] for name, info in result["contenders"].items()])]
    if result["skipped"]:
        sections += ["## Skipped", "\n".join(f"- {name}: {note}" for name, note in result["skipped"].items())]
    return "\n\n".join(sections) + "\n"
