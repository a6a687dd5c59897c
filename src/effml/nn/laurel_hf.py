"""``apply_laurel``: put LAuReL residuals (arXiv 2411.07501, ``effml.nn.laurel``) into a Hugging Face decoder in place.

Paper: G. Menghani, R. Kumar, S. Kumar, "LAuReL: Learned Augmented Residual Layer", ICML 2025, arXiv 2411.07501.

Each decoder layer keeps its own sub-modules and weights; its two residual additions (around self-attention and around
the MLP) become ``LaurelResidual`` modules, added as ``laurel_attn`` and ``laurel_mlp`` children of the layer:

    h   = laurel_attn(x, attention(norm_1(x)), history)
    out = laurel_mlp(h, mlp(norm_2(h)), history)

How: the layer object is kept (parameter names, hooks, gradient checkpointing and Hugging Face's output recording all
still work) and its class is switched to a subclass whose ``forward`` runs the original sub-modules with the LAuReL
residuals — the same computation as the original forward (``transformers`` 5.x signatures) except for the residual
additions. For PA, the layers share one stream history that is cleared at the start of every forward of the decoder
(a forward pre-hook), so KV-cache generation sees, for the new tokens, exactly the states a full forward would, and
again at its end (a forward hook, also when the forward raises), so the model keeps no activations (and no autograd
graph) between forwards and stays deep-copyable.

A converted model pickles (``torch.save(model)``, ``copy.deepcopy``): the layer classes (``LaurelLlamaDecoderLayer``,
``LaurelGPT2Block``) are attributes of this module, built on first use, also by an unpickling process that has not
converted a model itself.

Supported: the Llama family (``LlamaDecoderLayer``: Llama 2/3, SmolLM/SmolLM2, TinyLlama, ...) and GPT-2
(``GPT2Block``, without cross-attention). Other architectures raise a ValueError naming what is supported.
Identity-initialised variants (every variant at its default initialisation) leave the model's outputs unchanged at
conversion, so a pretrained model can be converted and then fine-tuned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from effml.nn.laurel import LaurelConfig, LaurelResidual, laurel_options
from effml.nn.residual import StreamHistory

__all__ = ["apply_laurel", "supported_architectures"]


class _SharedHistory:
    """The PA stream history shared by the converted layers of one model; cleared before and after every decoder
    forward (``reset`` is both the pre-hook and the hook)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.history = StreamHistory(size)

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.history = StreamHistory(self.size)


def _connect(layer: nn.Module, residual: LaurelResidual, x: Tensor, fx: Tensor) -> Tensor:
    shared: _SharedHistory | None = layer._laurel_shared
    if shared is None:
        return residual(x, fx)
    if layer.training and getattr(layer, "gradient_checkpointing", False):
        # a recomputed layer would read the history as it is after the whole forward, not as it was: wrong gradients
        raise ValueError("LAuReL-PA keeps a history of earlier layers' states, which gradient checkpointing cannot "
                         "replay; disable it (model.activation_checkpointing_disable(), formerly "
                         "gradient_checkpointing_disable()) or use a variant without 'pa'.")
    out = residual(x, fx, shared.history.recent(residual.history_size))
    shared.history.push(x)
    return out


def _llama_forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                   position_ids: Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = False,
                   position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs: Any) -> Tensor:
    """LlamaDecoderLayer.forward with LAuReL residuals: (B, T, D) → (B, T, D)."""
    attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
    hidden_states = _connect(self, self.laurel_attn, hidden_states, attn_out)
    mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
    return _connect(self, self.laurel_mlp, hidden_states, mlp_out)


def _gpt2_forward(self, hidden_states: Tensor, past_key_values: Any = None, attention_mask: Tensor | None = None,
                  encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                  use_cache: bool | None = False, **kwargs: Any) -> Tensor:
    """GPT2Block.forward (no cross-attention) with LAuReL residuals: (B, T, D) → (B, T, D)."""
    if encoder_hidden_states is not None:
        raise ValueError("apply_laurel converted this GPT-2 block without cross-attention; encoder_hidden_states "
                         "cannot be used with it.")
    attn_out, _ = self.attn(self.ln_1(hidden_states), past_key_values=past_key_values,
                            attention_mask=attention_mask, use_cache=use_cache, **kwargs)
    hidden_states = _connect(self, self.laurel_attn, hidden_states, attn_out)
    mlp_out = self.mlp(self.ln_2(hidden_states))
    return _connect(self, self.laurel_mlp, hidden_states, mlp_out)


def _llama_width(layer: nn.Module) -> int:
    return layer.hidden_size


def _gpt2_width(layer: nn.Module) -> int:
    if hasattr(layer, "crossattention"):
        raise ValueError("apply_laurel: this GPT-2 model has cross-attention (config.add_cross_attention=True), "
                         "which apply_laurel does not convert; use a decoder-only GPT-2.")
    return layer.ln_1.normalized_shape[0]


def _adapters() -> dict[type, tuple[str, Callable[..., Tensor], Callable[[nn.Module], int]]]:
    """Decoder-layer class → (family name, LAuReL forward, width getter); imported lazily (transformers is an
    optional dependency)."""
    try:
        import transformers
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("apply_laurel needs the transformers package: pip install 'effml[hf]'.") from error
    if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover - depends on the environment
        raise ImportError(f"apply_laurel follows the decoder-layer signatures of transformers 5.x, but "
                          f"{transformers.__version__} is installed: pip install 'transformers>=5'.")
    return {LlamaDecoderLayer: ("llama", _llama_forward, _llama_width),
            GPT2Block: ("gpt2", _gpt2_forward, _gpt2_width)}


def supported_architectures() -> list[str]:
    """Names of the decoder-layer classes ``apply_laurel`` converts."""
    return sorted(cls.__name__ for cls in _adapters())


_CONVERTED: dict[type, type] = {}


def _laurel_class(cls: type, forward: Callable[..., Tensor]) -> type:
    """The converted class of decoder-layer class ``cls``: ``Laurel<cls name>``, a subclass with the LAuReL
    ``forward``, made once and registered as an attribute of this module under its name, so that pickle finds it."""
    if cls not in _CONVERTED:
        name = f"Laurel{cls.__name__}"
        converted = type(name, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": name})
        globals()[name] = _CONVERTED[cls] = converted
    return _CONVERTED[cls]


def __getattr__(name: str) -> type:
    """Module attribute look-up of a converted layer class that was not made yet in this process (PEP 562): an
    unpickling process finds ``LaurelLlamaDecoderLayer`` etc. here without converting a model first."""
    if name.startswith("Laurel"):
        for cls, (_, forward, _) in _adapters().items():
            if name == f"Laurel{cls.__name__}":
                return _laurel_class(cls, forward)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apply_laurel(model: nn.Module, variant: str | LaurelConfig = "rw+lr", **options: Any) -> nn.Module:
    """Convert every decoder layer of a Hugging Face Llama-family or GPT-2 ``model`` to LAuReL residuals, in place.

    Args:
        model: e.g. ``LlamaForCausalLM``, ``LlamaModel``, ``GPT2LMHeadModel``, ``GPT2Model``.
        variant, **options: as ``effml.nn.laurel.LaurelResidual`` ("rw", "lr", "rw+lr", "rw+lr+pa", ...; rank,
            bound, per_channel, k, pa_map, lr_init, scale), or a ``LaurelConfig`` as ``variant`` and no options.
            ``channel_dim`` must be -1, the default (hidden states are (B, T, D)).

    Returns:
        ``model`` itself. The new parameters (``...laurel_attn.*``, ``...laurel_mlp.*``) are created in the dtype and on
        the device of each layer's weights and require gradients.

    Raises:
        ValueError: no supported decoder layer in the model (the message lists the supported classes), a layer that
        was already converted, or bad options.

    Saving and reloading: ``save_pretrained``/``state_dict`` include the ``laurel_*`` weights, but ``from_pretrained``
    builds the original architecture and drops them (with an "unexpected keys" warning), so a fine-tuned LAuReL model
    is reloaded by converting first, with the same variant and options, and loading the saved weights after::

        model = LlamaForCausalLM.from_pretrained(path)  # the laurel_* weights are dropped here
        apply_laurel(model, "rw+lr", rank=16)           # as when it was saved: fresh, identity-initialised residuals
        model.load_state_dict(safetensors.torch.load_file(f"{path}/model.safetensors"), strict=False)

    which restores the outputs exactly. ``strict=False`` because save_pretrained leaves tied weights out of the file
    (GPT-2's ``lm_head.weight``; the call returns them as the only missing keys); a ``model.state_dict()`` saved with
    ``torch.save`` loads with the default ``strict=True``. ``torch.save(model)``/``torch.load`` of the whole converted
    model also works.
    """
    options = laurel_options("apply_laurel", variant, options)
    if options.get("channel_dim", -1) != -1:
        raise ValueError(f"apply_laurel: channel_dim={options['channel_dim']}, but Hugging Face hidden states are "
                         "(B, T, D) with the channels last; use channel_dim=-1 (the default).")
    adapters = _adapters()
    converted_classes = set(_CONVERTED.values())
    layers = [(name, module) for name, module in model.named_modules()
              if type(module) in adapters or type(module) in converted_classes]
    if not layers:
        raise ValueError(f"apply_laurel cannot convert {type(model).__name__}: it has no decoder layer of a supported "
                         f"architecture ({', '.join(supported_architectures())}). Supported are the Llama family "
                         "(Llama, SmolLM2, TinyLlama, ...) and GPT-2; other architectures need their own adapter.")
    already = [name for name, module in layers if type(module) in converted_classes]
    if already:
        raise ValueError(f"apply_laurel: {type(model).__name__} already has LAuReL residuals (layer {already[0]!r}); "
                         "convert the original model only once.")
    residuals = []
    for _, layer in layers:
        _, forward, width = adapters[type(layer)]
        d_model = width(layer)
        reference = next(layer.parameters())
        layer.laurel_attn = LaurelResidual(d_model, 0, **options).to(reference.device, reference.dtype)
        layer.laurel_mlp = LaurelResidual(d_model, 1, **options).to(reference.device, reference.dtype)
        residuals.append(layer)
        layer.__class__ = _laurel_class(type(layer), forward)
    history_size = max(r.history_size for layer in residuals for r in (layer.laurel_attn, layer.laurel_mlp))
    shared = _SharedHistory(history_size) if history_size > 0 else None
    for layer in residuals:
        layer._laurel_shared = shared
    if shared is not None:
        owner = _owner_of_layers(model, residuals[0])
        owner.register_forward_pre_hook(shared.reset)
        owner.register_forward_hook(shared.reset, always_call=True)  # drop the states (and their graph) afterwards
    return model


def _owner_of_layers(model: nn.Module, layer: nn.Module) -> nn.Module:
    """The innermost module whose forward runs ``layer`` through its layer list (LlamaModel, GPT2Model)."""
    owner = model
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and any(item is layer for item in child):
                owner = module
    return owner

