"""The discrete VAE of DALL-E (stage 1): images -> a grid of tokens -> images.

Architecture as in the paper and OpenAI's released `dall-e` code (encoder.py / decoder.py):
module names mirror theirs (blocks.input, blocks.group_1.block_1.res_path.conv_1, ...) so that
dalle_fast.models.convert maps their state dicts onto ours key for key (only w/b -> weight/bias).

Training objective (paper, appendix A.2): with q = softmax(encoder logits) over the vocabulary,
    loss = [ -ln p(x | z) + beta * KL(q || uniform) ] / (C * H * W)
where -ln p(x | z) is the logit-Laplace negative log likelihood summed over pixels and the KL is
summed over token positions, so the KL's weight per position is beta / (C*H*W / positions)
(= beta / 192 for 256x256x3 -> 32x32). z is the Gumbel-softmax relaxation of q at temperature tau.
"""
import dataclasses
import json
import math
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import dalle_fast
from dalle_fast.checkpoint import CheckpointError, atomic_save_safetensors, atomic_write_json, load_safetensors
from dalle_fast.checks import check_ids


@dataclasses.dataclass
class DVAEConfig:
    """Sizes of the dVAE; the defaults are the released DALL-E dVAE (256x256 -> 32x32 tokens of 8192 codes).

    Args:
        image_size: pixels per side.
        input_channels: 3 for RGB.
        group_count: groups of residual blocks; 2**(group_count-1) pixels per token side.
        n_hid: width of the first group (later groups 2x, 4x, 8x ...).
        n_blk_per_group: residual blocks per group.
        vocab_size: codebook size.
        n_init: decoder width after the 1x1 conv from the codes.
        eps: logit-Laplace pixel margin (map_pixels / unmap_pixels).
        min_log_b: floor on the decoder's ln b in the training loss (None: the paper's loss exactly).
        codebook_init_std: std of the decoder's input conv (the codebook: one column per code) at
            initialisation (None: the paper's rule, 1/sqrt(vocab_size)).
        encoder_output_init_gain: multiplies the std of the encoder's output 1x1 conv (the logits) at
            initialisation (None: the paper's rule, gain 1; > 0).
        decoder_mu_init: initial bias of the decoder's mu outputs, in logit space (None: the paper's zero
            bias, mid-grey; logit(eps) starts the decoder at black).
    """
    image_size: int = 256
    input_channels: int = 3
    group_count: int = 4        # groups of residual blocks; 2**(group_count-1) pixels per token side
    n_hid: int = 256            # width of the first group (later groups 2x, 4x, 8x ...)
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    n_init: int = 128           # decoder width after the 1x1 conv from the codes
    eps: float = 0.1            # logit-Laplace pixel margin (map_pixels / unmap_pixels)
    # Floor on the decoder's ln b in the training loss (None: the paper's loss exactly). Noiseless
    # synthetic images (Shapes: flat colours on black) make the logit-Laplace density unbounded:
    # b -> 0 on the background keeps lowering the loss while the object pixels, at large b, get
    # little gradient. A floor bounds that and lets the objects be learnt.
    min_log_b: float = None
    # The decoder's 1x1 input conv reads (near) one-hot codes, so each code's column is what the first
    # layer sees: the paper's fan-in rule makes it 1/sqrt(vocab_size) small. None keeps that rule.
    codebook_init_std: float = None
    # The encoder's logits at the paper's init have a std of about 0.1 over the codes, against the
    # Gumbel noise's 1.28: relaxed samples are noise. A gain > 1 on the output conv's init std makes
    # the samples follow the encoder's argmax more often (on Shapes it also collapses the codes sooner:
    # README, dVAE on Shapes). None keeps the paper's rule (gain 1).
    encoder_output_init_gain: float = None
    # The decoder starts at mid-grey (zero bias); on mostly black data its first updates are one
    # common-mode push to black. A value (e.g. logit(eps)) starts it there (a study knob: it did not
    # lift the paper's objective on Shapes, README). None keeps the paper's init.
    decoder_mu_init: float = None

    def __post_init__(self):
        for name in ("image_size", "input_channels", "group_count", "n_hid", "n_blk_per_group",
                     "vocab_size", "n_init"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DVAEConfig.{name} must be a positive int, got {v!r}")
        if self.n_hid % 4:
            raise ValueError(f"DVAEConfig.n_hid must be a multiple of 4 (blocks use n_out/4 hidden), got {self.n_hid}")
        if self.image_size % self.downsample:
            raise ValueError(f"DVAEConfig.image_size ({self.image_size}) must be divisible by "
                             f"2**(group_count-1) = {self.downsample}")
        if not 0 <= self.eps < 0.5:
            raise ValueError(f"DVAEConfig.eps must be in [0, 0.5), got {self.eps}")
        for name in ("codebook_init_std", "encoder_output_init_gain"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v <= 0):
                raise ValueError(f"DVAEConfig.{name} must be None or a positive number, got {v!r}")
        v = self.decoder_mu_init
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"DVAEConfig.decoder_mu_init must be None or a finite number, got {v!r}")

    @property
    def downsample(self):
        return 2 ** (self.group_count - 1)

    @property
    def tokens_per_side(self):
        return self.image_size // self.downsample

    @classmethod
    def paper(cls):
        """The released DALL-E dVAE: 256x256 -> 32x32 tokens of 8192 codes.

        Returns:
            A DVAEConfig.
        """
        return cls()

    @classmethod
    def small(cls):
        """64x64 -> 8x8 tokens of 512 codes: trains in minutes on a CPU (demo, Shapes).

        Returns:
            A DVAEConfig.
        """
        return cls(image_size=64, n_hid=32, n_blk_per_group=1, vocab_size=512, n_init=64)

    @classmethod
    def small16(cls):
        """64x64 -> 16x16 tokens of 512 codes (4x4 pixels a token). An 8x8 grid gives a small Shapes
        object (14 pixels) two or three tokens a side and loses much of its shape (scripts/dvae_ceiling.py);
        this grid keeps more of it, for 4x the transformer's image tokens (not yet the bundle's: README).

        Returns:
            A DVAEConfig.
        """
        return cls(image_size=64, group_count=3, n_hid=32, n_blk_per_group=1, vocab_size=512, n_init=64)

    @classmethod
    def tiny(cls):
        """For tests: 32x32 -> 4x4 tokens, a few thousand parameters per layer.

        Returns:
            A DVAEConfig.
        """
        return cls(image_size=32, n_hid=16, n_blk_per_group=1, vocab_size=64, n_init=16)

    @classmethod
    def named(cls, name):
        """A preset by name.

        Args:
            name: 'paper', 'small', 'small16' or 'tiny'; others raise ValueError.
        Returns:
            A DVAEConfig.
        """
        presets = {"paper": cls.paper, "small": cls.small, "small16": cls.small16, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown dVAE config {name!r}; expected one of {sorted(presets)}")
        return presets[name]()

    def to_dict(self):
        """The config as a JSON-able dict.

        Returns:
            {field: value}.
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The inverse of to_dict.

        Args:
            d: {field: value}; unknown fields raise ValueError.
        Returns:
            A DVAEConfig.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DVAEConfig fields {sorted(unknown)}")
        return cls(**d)


def _conv(n_in, n_out, kw):
    """Conv2d initialised as the paper: weights N(0, 1/sqrt(n_in*kw^2)), zero bias, 'same' padding."""
    conv = nn.Conv2d(n_in, n_out, kw, padding=(kw - 1) // 2)
    with torch.no_grad():
        conv.weight.normal_(std=1 / math.sqrt(n_in * kw ** 2))
        conv.bias.zero_()
    return conv


class FP32Conv(nn.Conv2d):
    """A conv kept in fp32 under autocast: the encoder's logits and the decoder's input projection
    from the (soft) one-hot codes are precision-sensitive (the released code also keeps them fp32)."""

    def forward(self, x):
        """Args:
            x: (B, C, H, W), cast to fp32 with autocast off.
        Returns:
            The fp32 convolution of x.
        """
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def _fp32_conv(n_in, n_out, kw):
    conv = FP32Conv(n_in, n_out, kw, padding=(kw - 1) // 2)
    with torch.no_grad():
        conv.weight.normal_(std=1 / math.sqrt(n_in * kw ** 2))
        conv.bias.zero_()
    return conv


class _Block(nn.Module):
    """identity (1x1 conv when widths differ) + post_gain * residual; residual = 4 x (ReLU, conv)."""

    def __init__(self, n_in, n_out, n_layers, kernels):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _conv(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_Block):
    """Encoder residual block: identity (1x1 conv when widths differ) + post_gain * (ReLU, conv) x 4,
    kernels 3, 3, 3, 1.

    Args:
        n_in, n_out: input and output channels.
        n_layers: blocks in the whole encoder (post_gain = 1 / n_layers**2).
    """
    def __init__(self, n_in, n_out, n_layers):
        super().__init__(n_in, n_out, n_layers, (3, 3, 3, 1))


class DecoderBlock(_Block):
    """Decoder residual block: identity (1x1 conv when widths differ) + post_gain * (ReLU, conv) x 4,
    kernels 1, 3, 3, 3.

    Args:
        n_in, n_out: input and output channels.
        n_layers: blocks in the whole decoder (post_gain = 1 / n_layers**2).
    """
    def __init__(self, n_in, n_out, n_layers):
        super().__init__(n_in, n_out, n_layers, (1, 3, 3, 3))


class Encoder(nn.Module):
    """map_pixels(image) -> (B, vocab, H/ds, W/ds) logits.

    Args:
        cfg: the DVAEConfig.
    """

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        blocks = [("input", _conv(cfg.input_channels, cfg.n_hid, 7))]
        n_in = cfg.n_hid
        for g in range(cfg.group_count):
            width = 2 ** g * cfg.n_hid
            group = []
            for i in range(cfg.n_blk_per_group):
                group.append((f"block_{i + 1}", EncoderBlock(n_in, width, n_layers)))
                n_in = width
            if g < cfg.group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        out_conv = _fp32_conv(n_in, cfg.vocab_size, 1)
        if cfg.encoder_output_init_gain is not None:
            with torch.no_grad():
                out_conv.weight.mul_(cfg.encoder_output_init_gain)
        blocks.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", out_conv)]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, x):
        """Args:
            x: (B, C, H, W) mapped pixels (map_pixels).
        Returns:
            (B, vocab, H/ds, W/ds) logits.
        """
        return self.blocks(x)


class Decoder(nn.Module):
    """(B, vocab, h, w) one-hot or relaxed codes -> (B, 2*C, h*ds, w*ds) stats: mu then ln b.

    Args:
        cfg: the DVAEConfig.
    """

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        blocks = [("input", _fp32_conv(cfg.vocab_size, cfg.n_init, 1))]
        if cfg.codebook_init_std is not None:
            with torch.no_grad():
                blocks[0][1].weight.normal_(std=cfg.codebook_init_std)
        n_in = cfg.n_init
        for g in range(cfg.group_count):
            width = 2 ** (cfg.group_count - 1 - g) * cfg.n_hid
            group = []
            for i in range(cfg.n_blk_per_group):
                group.append((f"block_{i + 1}", DecoderBlock(n_in, width, n_layers)))
                n_in = width
            if g < cfg.group_count - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        out_conv = _conv(n_in, 2 * cfg.input_channels, 1)
        if cfg.decoder_mu_init is not None:
            with torch.no_grad():
                out_conv.bias[:cfg.input_channels] = cfg.decoder_mu_init
        blocks.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", out_conv)]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, z):
        """Args:
            z: (B, vocab, h, w) one-hot or relaxed codes.
        Returns:
            (B, 2*C, h*ds, w*ds) stats: mu (logit space) then ln b.
        """
        return self.blocks(z)

    def forward_tokens(self, tokens):
        """Same as forward(one_hot(tokens)) but the 1x1 input conv of a one-hot is a column gather:
        no (B, vocab, h, w) tensor is built.

        Args:
            tokens: (B, h, w) long codes.
        Returns:
            (B, 2*C, h*ds, w*ds) stats.
        """
        conv = self.blocks.input
        w = conv.weight[:, :, 0, 0].float()                     # (n_init, vocab)
        x = F.embedding(tokens, w.t()) + conv.bias.float()      # (B, h, w, n_init)
        x = x.permute(0, 3, 1, 2)
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)
        return x


def kl_to_uniform(logits, dim=1):
    """KL(softmax(logits) || uniform) per position, summed over `dim`; computed in fp32.

    Args:
        logits: encoder logits, e.g. (B, vocab, h, w).
        dim: the codebook dimension.
    Returns:
        The KL per position (logits' shape without dim), fp32.
    """
    logits = logits.float()
    logq = F.log_softmax(logits, dim=dim)
    return (logq.exp() * logq).sum(dim) + math.log(logits.shape[dim])


def codebook_perplexity(tokens, vocab_size):
    """exp(entropy) of the histogram of used codes: 1 = one code used, vocab_size = all uniformly.

    Args:
        tokens: long tensor of codes (any shape).
        vocab_size: codebook size.
    Returns:
        float.
    """
    counts = torch.bincount(tokens.reshape(-1), minlength=vocab_size).double()
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()


def psnr(images, target):
    """Peak signal-to-noise ratio in dB of images in [0, 1], averaged over the batch's MSE.

    Args:
        images, target: tensors of the same shape in [0, 1].
    Returns:
        float (dB).
    """
    mse = F.mse_loss(images.float(), target.float()).item()
    return 10 * math.log10(1 / max(mse, 1e-12))


class DiscreteVAE(nn.Module):
    """DALL-E's dVAE. backend='fused' uses dalle_fast's kernels (gumbel_softmax, logit_laplace_loss);
    'torch' the same math with torch.nn.functional.gumbel_softmax and an eager loss (baseline).

    Args:
        config: a DVAEConfig (default: the paper's).
        backend: 'fused' or 'torch'.
    """

    def __init__(self, config: DVAEConfig = None, backend="fused"):
        super().__init__()
        self.config = config if config is not None else DVAEConfig()
        if not isinstance(self.config, DVAEConfig):
            raise TypeError(f"config must be a DVAEConfig, got {type(self.config).__name__}")
        self.backend = backend
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        if value not in ("fused", "torch"):
            raise ValueError(f"backend must be 'fused' or 'torch', got {value!r}")
        self._backend = value

    # -- downstream properties ----------------------------------------------------------------
    @property
    def vocab_size(self):
        return self.config.vocab_size

    @property
    def image_size(self):
        return self.config.image_size

    @property
    def tokens_per_side(self):
        return self.config.tokens_per_side

    @property
    def num_tokens(self):
        return self.config.tokens_per_side ** 2

    # -- checks ---------------------------------------------------------------------------------
    def _check_images(self, images):
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != self.config.input_channels:
            raise ValueError(f"images must have shape (B, {self.config.input_channels}, H, W), got "
                             f"{tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor with values in [0, 1], got {images.dtype}")
        ds = self.config.downsample
        if images.shape[2] % ds or images.shape[3] % ds:
            raise ValueError(f"image height and width must be multiples of {ds}, got {tuple(images.shape[2:])}")

    def _check_tokens(self, tokens):
        if not torch.is_tensor(tokens) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an int64/int32 tensor of shape (B, h, w), got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.dim() != 3:
            raise ValueError(f"tokens must have shape (B, h, w), got {tuple(tokens.shape)}")
        check_ids(tokens, self.vocab_size, "tokens")

    # -- the ops, fused or eager ----------------------------------------------------------------
    def _map(self, x):
        return dalle_fast.map_pixels(x, self.config.eps)

    def _unmap(self, x):
        return dalle_fast.unmap_pixels(x, self.config.eps)

    def _relax(self, logits, tau, hard):
        if self.backend == "fused":
            return dalle_fast.gumbel_softmax(logits, tau, hard=hard, dim=1)
        return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=1)

    def _recon_loss(self, images, stats):
        if self.backend == "fused":
            return dalle_fast.logit_laplace_loss(images, stats, eps=self.config.eps, reduction="mean")
        return logit_laplace_nll_eager(images, stats, self.config.eps).mean()

    # -- public API -----------------------------------------------------------------------------
    def logits(self, images):
        """Encoder logits in fp32.

        Args:
            images: (B, C, H, W) in [0, 1].
        Returns:
            (B, vocab, h, w) fp32 logits.
        """
        self._check_images(images)
        return self.encoder(self._map(images)).float()

    def forward(self, images, tau=1.0, beta=0.0, hard=False, mse_weight=0.0):
        """One training evaluation. mse_weight > 0 adds an auxiliary squared error (not in the paper): the
        logit-Laplace is an L1 in logit space whose optimum is the median, so on mostly-black images
        it predicts black wherever an object is not yet certain and learns the objects very slowly;
        the trainer decays this weight to 0, leaving the paper's objective.

        Args:
            images: (B, C, H, W) in [0, 1].
            tau: Gumbel-softmax temperature, > 0.
            beta: weight of the KL to the uniform prior.
            hard: straight-through one-hot samples instead of relaxed ones.
            mse_weight: weight of the auxiliary squared error (0: the paper's loss).
        Returns:
            A dict: loss (recon + beta * kl [+ mse_weight * mse], normalised per image dimension as the
            paper), recon (logit-Laplace NLL per dimension), kl (per dimension, unweighted), mse (of the
            unclamped reconstruction), logits, stats, tokens (argmax, no noise).
        """
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"tau must be a positive number, got {tau!r}")
        logits = self.logits(images)
        z = self._relax(logits, float(tau), hard)
        stats = self.decoder(z).float()
        if self.config.min_log_b is not None:
            c = self.config.input_channels
            stats = torch.cat([stats[:, :c], stats[:, c:].clamp(min=self.config.min_log_b)], 1)
        recon = self._recon_loss(images.float(), stats)
        dims = images.shape[1] * images.shape[2] * images.shape[3]
        kl = kl_to_uniform(logits).sum((1, 2)).mean() / dims
        c, eps = self.config.input_channels, self.config.eps
        mse = ((torch.sigmoid(stats[:, :c]) - eps) / (1 - 2 * eps) - images.float()).square().mean()
        loss = recon + beta * kl
        if mse_weight:
            loss = loss + mse_weight * mse
        return {"loss": loss, "recon": recon, "kl": kl, "mse": mse.detach(), "logits": logits, "stats": stats,
                "tokens": logits.detach().argmax(1)}

    @torch.no_grad()
    def encode(self, images):
        """Tokens of images: argmax, no noise.

        Args:
            images: (B, C, H, W) in [0, 1].
        Returns:
            LongTensor (B, H/ds, W/ds).
        """
        return self.logits(images).argmax(1)

    def decode_stats(self, tokens):
        """Args:
            tokens: (B, h, w) codes.
        Returns:
            Decoder stats (B, 2C, H, W) in fp32: mu (logit space) then ln b.
        """
        self._check_tokens(tokens)
        return self.decoder.forward_tokens(tokens.long()).float()

    @torch.no_grad()
    def decode(self, tokens):
        """Images of tokens: unmap(sigmoid(mu)).

        Args:
            tokens: (B, h, w) codes.
        Returns:
            (B, C, H, W) images in [0, 1].
        """
        stats = self.decode_stats(tokens)
        return self._unmap(torch.sigmoid(stats[:, : self.config.input_channels]))

    @torch.no_grad()
    def reconstruct(self, images):
        """decode(encode(images)).

        Args:
            images: (B, C, H, W) in [0, 1].
        Returns:
            (B, C, H, W) reconstructions in [0, 1].
        """
        return self.decode(self.encode(images))

    # -- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory):
        """directory/config.json + directory/model.safetensors (each written atomically).

        Args:
            directory: created if missing.
        Returns:
            directory.
        """
        os.makedirs(directory, exist_ok=True)
        atomic_save_safetensors(self.state_dict(), os.path.join(directory, "model.safetensors"),
                                metadata={"format": "dalle_fast.dvae"})
        atomic_write_json({"model": "DiscreteVAE", "config": self.config.to_dict()},
                          os.path.join(directory, "config.json"))
        return directory

    @classmethod
    def from_pretrained(cls, directory, device="cpu", backend="fused"):
        """A model saved by save_pretrained; raises CheckpointError on a missing or corrupt directory.

        Args:
            directory: holds config.json and model.safetensors.
            device: where the model goes.
            backend: 'fused' or 'torch'.
        Returns:
            A DiscreteVAE.
        """
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"no dVAE config at {cfg_path} (expected a directory written by save_pretrained)")
        try:
            with open(cfg_path) as f:
                meta = json.load(f)
            config = DVAEConfig.from_dict(meta["config"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"corrupt dVAE config {cfg_path}: {e}") from e
        state = load_safetensors(os.path.join(directory, "model.safetensors"), device)
        model = cls(config, backend=backend)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"weights in {directory} do not match its config: {e}") from e
        return model.to(device)


def logit_laplace_nll_eager(x, stats, eps=0.1):
    """Per-element logit-Laplace NLL with eager torch ops (the benchmark's baseline):
    ln(2b) + ln(x'(1-x')) + |logit(x') - mu| / b, x' = map_pixels(x), b = exp(ln b).

    Args:
        x: (B, C, H, W) in [0, 1].
        stats: (B, 2C, H, W): mu then ln b.
        eps: the pixel margin.
    Returns:
        (B, C, H, W) NLL per element.
    """
    c = x.shape[1]
    mu, log_b = stats[:, :c], stats[:, c:]
    xm = (1 - 2 * eps) * x + eps
    return math.log(2) + log_b + torch.log(xm * (1 - xm)) + (torch.logit(xm) - mu).abs() * torch.exp(-log_b)
