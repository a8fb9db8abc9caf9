"""PyTorch statements of PCDMs' networks, the references of tests/test_pcdm_models.py and of the sampling
comparison (tests/pcdm_sampling_reference.py, bench/sample_pcdm.py): the stage-1 prior built from diffusers'
BasicTransformerBlock / Timesteps / TimestepEmbedding in the token order of the reference notes, the original's
MLP layout, the container with the original's stage-2 / stage-3 state-dict prefixes, and `perturb`."""

import torch
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding
from diffusers.models.embeddings import Timesteps as TorchTimesteps


class TorchMLP(torch.nn.Module):
    """The original's MLP layout: net = Linear, GELU, Dropout, LayerNorm, Linear, Dropout[, LayerNorm]."""

    def __init__(self, in_dim, hidden, out_dim, final_norm):
        super().__init__()
        layers = [torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Dropout(0.0), torch.nn.LayerNorm(hidden),
                  torch.nn.Linear(hidden, out_dim), torch.nn.Dropout(0.0)]
        self.net = torch.nn.Sequential(*layers, *([torch.nn.LayerNorm(out_dim)] if final_norm else []))

    def forward(self, x):
        return self.net(x)


class TorchPrior(torch.nn.Module):
    """PCDMs' stage-1 prior as the reference notes (section 1.4-1.5) describe it: 6 tokens [source pose,
    target pose, source image, time, x_t, prd] + positional embedding, diffusers transformer blocks, no mask,
    norm_out, last token projected to the embedding width."""

    def __init__(self, embedding_dim, num_layers, num_attention_heads, attention_head_dim, pose_dim, pose_hidden):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.pose_encoder = TorchMLP(pose_dim, pose_hidden, embedding_dim, final_norm=True)
        self.pose_encoder1 = TorchMLP(pose_dim, pose_hidden, embedding_dim, final_norm=True)
        self.time_proj = TorchTimesteps(inner, True, 0)
        self.time_embedding = TorchTimestepEmbedding(inner, inner)
        self.proj_in = torch.nn.Linear(embedding_dim, inner)
        self.embedding_proj = torch.nn.Linear(embedding_dim, inner)
        self.encoder_hidden_states_proj = torch.nn.Linear(embedding_dim, inner)
        self.encoder_hidden_states_proj1 = torch.nn.Linear(embedding_dim, inner)
        self.positional_embedding = torch.nn.Parameter(torch.zeros(1, 6, inner))
        self.prd_embedding = torch.nn.Parameter(torch.zeros(1, 1, inner))
        self.transformer_blocks = torch.nn.ModuleList([
            TorchBasicTransformerBlock(inner, num_attention_heads, attention_head_dim, activation_fn="gelu",
                                       attention_bias=True) for _ in range(num_layers)])
        self.norm_out = torch.nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = torch.nn.Linear(inner, embedding_dim)

    def forward(self, noisy, timesteps, source, source_pose, target_pose):
        batch = noisy.shape[0]
        time = self.time_embedding(self.time_proj(timesteps))
        tokens = torch.stack([
            self.encoder_hidden_states_proj(self.pose_encoder(source_pose)),
            self.encoder_hidden_states_proj1(self.pose_encoder1(target_pose)),
            self.embedding_proj(source),
            time,
            self.proj_in(noisy),
            self.prd_embedding[:, 0].expand(batch, -1),
        ], dim=1)
        hidden = tokens + self.positional_embedding
        for block in self.transformer_blocks:
            hidden = block(hidden)
        return self.proj_to_clip_embeddings(self.norm_out(hidden)[:, -1])


class TorchStage(torch.nn.Module):
    """A container whose state dict has the original's stage-2 / stage-3 prefixes."""

    def __init__(self, unet, image_proj_model_p, pose_proj=None):
        super().__init__()
        self.unet = unet
        self.image_proj_model_p = image_proj_model_p
        if pose_proj is not None:
            self.pose_proj = pose_proj


def perturb(module, seed):
    """Adds noise to every 1-D parameter (norm scales, biases) and to the prior's embeddings, so that the
    torch defaults (ones, zeros) cannot hide a mis-mapped parameter; conv_out of a pose encoder gets random
    weights instead of zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim == 1 or name.endswith("embedding") or "conv_out" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module.eval()
