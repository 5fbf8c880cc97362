"""OpenAI's released dVAE (`dall-e` package: dall_e.Encoder / dall_e.Decoder, or the state dicts of
encoder.pkl / decoder.pkl) -> dalle_fast.models.DiscreteVAE.

Our modules carry the same names as theirs, so the mapping is key for key: 'blocks.X.w' ->
'encoder.blocks.X.weight', 'blocks.X.b' -> '....bias'. The configuration is read off the tensor
shapes. Their encoder expects map_pixels(x) as input, as does ours internally, so
DiscreteVAE.logits(x) == dall_e.Encoder(map_pixels(x)) and decoder stats agree exactly.
"""
import re

import torch

from .dvae import DiscreteVAE, DVAEConfig


def _state_dict(obj, what):
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        return obj
    raise TypeError(f"{what} must be a dall_e module or its state dict, got {type(obj).__name__}")


def _rename(sd, prefix, what):
    out = {}
    for key, val in sd.items():
        m = re.fullmatch(r"(blocks\..+)\.(w|b)", key)
        if m is None:
            raise ValueError(f"unexpected key {key!r} in the {what} state dict (expected 'blocks....w' / '.b')")
        out[f"{prefix}.{m.group(1)}.{'weight' if m.group(2) == 'w' else 'bias'}"] = val.detach().float()
    return out


def _count(sd, pattern):
    return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})


def config_from_openai(enc_sd, dec_sd, image_size=256):
    """DVAEConfig matching the shapes of the two state dicts.

    Args:
        enc_sd, dec_sd: state dicts of a dall_e Encoder and Decoder.
        image_size: sets config.image_size.
    Returns:
        A DVAEConfig; raises ValueError if the dicts are not a matching dall_e pair.
    """
    try:
        w_in = enc_sd["blocks.input.w"]
        vocab, n_hid_out = enc_sd["blocks.output.conv.w"].shape[:2]
        n_init = dec_sd["blocks.input.w"].shape[0]
        out_ch = dec_sd["blocks.output.conv.w"].shape[0] // 2
    except KeyError as e:
        raise ValueError(f"not a dall_e Encoder/Decoder state dict: missing {e}") from e
    group_count = _count(enc_sd, r"blocks\.group_(\d+)\.")
    n_blk = _count(enc_sd, r"blocks\.group_1\.block_(\d+)\.")
    cfg = DVAEConfig(image_size=image_size, input_channels=w_in.shape[1], group_count=group_count,
                     n_hid=w_in.shape[0], n_blk_per_group=n_blk, vocab_size=vocab, n_init=n_init)
    if n_hid_out != 2 ** (group_count - 1) * cfg.n_hid or out_ch != cfg.input_channels:
        raise ValueError("encoder and decoder state dicts describe different models")
    if dec_sd["blocks.input.w"].shape[1] != vocab:
        raise ValueError(f"decoder vocabulary {dec_sd['blocks.input.w'].shape[1]} != encoder vocabulary {vocab}")
    return cfg


def convert_openai_state_dicts(encoder, decoder):
    """Our state dict and config from a dall_e Encoder and Decoder.

    Args:
        encoder, decoder: dall_e modules or their state dicts.
    Returns:
        (state dict of DiscreteVAE, DVAEConfig).
    """
    enc_sd, dec_sd = _state_dict(encoder, "encoder"), _state_dict(decoder, "decoder")
    cfg = config_from_openai(enc_sd, dec_sd)
    sd = {**_rename(enc_sd, "encoder", "encoder"), **_rename(dec_sd, "decoder", "decoder")}
    return sd, cfg


def from_openai(encoder, decoder, image_size=256, backend="fused"):
    """A DiscreteVAE with the weights of a dall_e Encoder/Decoder pair (e.g. the released
    encoder.pkl / decoder.pkl after torch.load).

    Args:
        encoder, decoder: dall_e modules or their state dicts.
        image_size: only sets config.image_size (the convolutional model runs on any multiple of
          2**(group_count-1)).
        backend: 'fused' or 'torch'.
    Returns:
        A DiscreteVAE.
    """
    sd, cfg = convert_openai_state_dicts(encoder, decoder)
    cfg.image_size = image_size
    cfg.__post_init__()
    model = DiscreteVAE(cfg, backend=backend)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model
