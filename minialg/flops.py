"""FLOPs of one denoiser forward, counted analytically from the config and the input shape (2 per multiply-add).

Used by the benchmark (TFLOP/s and MFU) and to reason about costs (what a cache saves, what a parallel mode costs).
The counts equal torch's FlopCounterMode on the models (tests/test_speed.py): matmuls, convolutions and attention;
elementwise work (norms, RoPE, softmax, GELU, modulation) is counted by neither.
"""

from .models.cogvideox import CogVideoXTransformerConfig
from .models.hunyuan import HunyuanVideoTransformerConfig
from .models.ltx import TIME_FREQ_DIM, LTXVideoTransformerConfig
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


def hunyuan_flops(cfg: HunyuanVideoTransformerConfig, x_shape: tuple, text_len: int) -> int:
    """FLOPs of one HunyuanVideoTransformer forward on x of shape (B, C, F, H, W) with text_len LLaMA states:
    patch embedding, the conditioning MLPs (timestep, guidance, pooled text; token_replace embeds the first
    frame's timestep 0 too), the token refiner, the adaLN projections (token_replace: a row for the first frame),
    double-stream blocks (video and text projections, joint attention over [video ; text], both MLPs), single-
    stream blocks (one projection of [video ; text], attention, MLP side by side), output head."""
    B, _, frames, height, width = x_shape
    pt, p = cfg.patch_size_t, cfg.patch_size
    L, T = frames // pt * (height // p) * (width // p), text_len
    S, D, M = L + T, cfg.num_attention_heads * cfg.attention_head_dim, int(cfg.num_attention_heads *
                                                                            cfg.attention_head_dim * cfg.mlp_ratio)
    rows = 2 if cfg.image_condition_type == "token_replace" else 1  # adaLN rows of the video tokens
    time = 256 * D + D * D  # one sinusoid MLP (timestep or guidance)
    macs = L * cfg.in_channels * pt * p * p * D  # patch embedding
    macs += time * (2 if cfg.guidance_embeds else 1) + cfg.pooled_projection_dim * D + D * D  # conditioning
    if rows == 2:
        macs += time + cfg.pooled_projection_dim * D + D * D  # the first frame's, at timestep 0
    macs += time + cfg.text_embed_dim * D + D * D + T * cfg.text_embed_dim * D  # refiner conditioning, proj_in
    macs += cfg.num_refiner_layers * (D * 2 * D + 4 * T * D * D + 2 * T * T * D + 8 * T * D * D)  # refiner blocks
    double = D * 6 * D * (rows + 1) + 4 * S * D * D + 2 * S * S * D + 2 * S * D * M  # adaLN, qkvo, attention, MLPs
    single = D * 3 * D * rows + 3 * S * D * D + 2 * S * S * D + S * D * M + S * (D + M) * D
    macs += cfg.num_layers * double + cfg.num_single_layers * single
    macs += D * 2 * D + L * D * cfg.out_channels * pt * p * p  # output adaLN and head
    return 2 * B * macs


def ltx_flops(cfg: LTXVideoTransformerConfig, x_shape: tuple, text_len: int, timesteps: int = 1) -> int:
    """FLOPs of one LTXVideoTransformer forward on packed tokens x (B, L, C) with text_len T5 states: proj_in, the
    timestep MLP and its six modulation vectors (`timesteps` per sample: 1, or one per token as the image-to-video
    pipelines pass them), the caption projection; per block self-attention over the L video tokens (q, k, v, out;
    QK^T, PV), cross-attention to the text (q, out; k, v; QK^T, PV), the 4x MLP; proj_out; 2 per multiply-add.
    Elementwise work (RMS norms, RoPE, softmax, GELU, modulation) is not counted."""
    B, L, _ = x_shape
    T, D = text_len, cfg.num_attention_heads * cfg.attention_head_dim
    macs = L * cfg.in_channels * D + timesteps * (TIME_FREQ_DIM * D + D * D + D * 6 * D)  # proj_in, time_embed
    macs += T * (cfg.caption_channels * D + D * D)  # caption projection
    block = 4 * L * D * D + 2 * L * L * D  # self-attention: q, k, v, out; QK^T, PV
    block += 2 * L * D * D + 2 * T * D * D + 2 * L * T * D  # cross-attention: q, out; k, v; QK^T, PV
    block += 8 * L * D * D  # MLP D -> 4D -> D
    macs += cfg.num_layers * block + L * D * (cfg.out_channels or cfg.in_channels)  # blocks, proj_out
    return 2 * B * macs
