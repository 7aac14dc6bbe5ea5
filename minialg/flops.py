"""FLOPs of one denoiser forward, counted analytically from the config and the input shape (2 per multiply-add).

Used by the benchmark (TFLOP/s and MFU) and to reason about costs (what a cache saves, what a parallel mode costs).
The counts equal torch's FlopCounterMode on the models (tests/test_speed.py): matmuls, convolutions and attention;
elementwise work (norms, RoPE, softmax, GELU, modulation) is counted by neither.
"""

from .models.cogvideox import CogVideoXTransformerConfig
from .models.wan import WanTransformerConfig


def wan_flops(cfg: WanTransformerConfig, x_shape: tuple, text_len: int, image_len: int = 0, timesteps: int = 1) -> int:
    """FLOPs of one WanTransformer forward on x of shape (B, C, F, H, W): patch embedding, time/text/image
    embedders, q/k/v/out and cross-attention projections, attention QK^T and PV, FFN, output head; 2 per
    multiply-add; `timesteps` per sample: 1, or one per latent frame (Wan 2.2 TI2V). Elementwise work (norms, RoPE,
    softmax, GELU, modulation) is not counted."""
    B, _, frames, height, width = x_shape
    pf, ph, pw = cfg.patch_size
    L, T, I = frames // pf * (height // ph) * (width // pw), text_len, image_len
    D, patch = cfg.num_attention_heads * cfg.attention_head_dim, pf * ph * pw
    macs = L * cfg.in_channels * patch * D  # patch embedding
    macs += timesteps * (cfg.freq_dim * D + D * D + D * 6 * D)  # time embedder, modulation: per timestep (TI2V: frame)
    macs += T * (cfg.text_dim * D + D * D)  # text embedder
    block = 4 * L * D * D + 2 * L * L * D  # self-attention: q, k, v, out; QK^T, PV
    block += 2 * L * D * D + 2 * T * D * D + 2 * L * T * D  # cross-attention to the text: q, out; k, v; QK^T, PV
    if image_len:
        macs += I * (cfg.image_dim * cfg.image_dim + cfg.image_dim * D)  # image embedder
        block += 2 * I * cfg.added_kv_proj_dim * D + 2 * L * I * D  # to the image: k, v; QK^T, PV
    block += 2 * L * D * cfg.ffn_dim  # FFN
    macs += cfg.num_layers * block + L * D * cfg.out_channels * patch  # blocks, output head
    return 2 * B * macs


def cogvideox_flops(cfg: CogVideoXTransformerConfig, x_shape: tuple, text_len: int) -> int:
    """FLOPs of one CogVideoXTransformer forward on x of shape (B, F, C, H, W): patch embedding, text projection,
    time (and ofs) embedding, the blocks' modulation, q/k/v/out projections, attention QK^T and PV over [text ;
    video], MLP, output norm and head; 2 per multiply-add. Elementwise work is not counted."""
    B, frames, _, height, width = x_shape
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    L, T = frames // pt * (height // p) * (width // p), text_len
    S, D, E = T + L, cfg.num_attention_heads * cfg.attention_head_dim, cfg.time_embed_dim
    macs = L * cfg.in_channels * pt * p * p * D + T * cfg.text_embed_dim * D  # patch embedding, text projection
    macs += D * E + E * E  # time embedding
    block = 2 * E * 6 * D  # the two LayerNormZero modulations
    block += 4 * S * D * D + 2 * S * S * D + 2 * S * D * 4 * D  # q, k, v, out; QK^T, PV; MLP
    macs += cfg.num_layers * block + E * 2 * D + L * D * p * p * pt * cfg.out_channels  # blocks, norm_out, head
    ofs = 2 * cfg.ofs_embed_dim**2 if cfg.ofs_embed_dim else 0  # 1.5 I2V: the ofs MLP, batch 1
    return 2 * (B * macs + ofs)
