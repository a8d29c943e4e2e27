"""`DVTLitModule`: DVT trained with the DeiT recipe on the sum of its exits' losses."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.methods.dvt.convert import AUTHORS_EXITS, authors_extras, convert_authors_checkpoint
from adaptive_vit.methods.dvt.model import DVT


class DVTLitModule(AdaptiveLitModule):
    """A cascade of transformers with early exit (docs/methods.md, "DVT: training").

    Training: every exit on every image, loss = sum of the exits' losses (soft-target CE under
    mixup / label smoothing), no distillation. Evaluation: real early exit at the thresholds
    (given by hand with ``thresholds``, or calibrated under a budget), with each exit's "anytime"
    top-1 logged beside the adaptive accuracy and GFLOPs.

    Every exit is the configured backbone at its own token grid; `backbone.pretrained` weights
    load into every exit (reused blocks keep them for everything but their widened norm2/fc1
    inputs), and the backbone's img_size and patch_size are set here.

    Args:
        img_size: input side.
        patch_sizes: patch convolution size per exit, coarsest first (DeiT-S: 32, 23, 16); null
            for a family whose tokenizer is set by `exit_kwargs` (T2T-ViT).
        paddings: zero padding per exit (DeiT-S: 0, 3, 0 → 7×7, 10×10, 14×14 tokens; null: none).
        feature_reuse: feature reuse on (False for the ablation).
        relation_reuse: relationship reuse on (False for the ablation).
        reuse_hidden: hidden width of each block's feature-reuse MLP (128).
        reuse_dim: channels each block reuses (48).
        exit_kwargs: backbone kwargs per exit, coarsest first (T2T-ViT: ``[{soft_split: [14, 8, 3]},
            {soft_split: [11, 6, 5]}, {soft_split: [7, 4, 2]}]`` → 7×7, 10×10, 14×14 tokens).
        reuse_upsample: per exit after the first, the side of the nearest upsampling in its reuse
            resizes (null: twice the upstream grid; the authors' code: 14 into a 10×10 exit, 20
            into a 14×14 one, so a 7×7 → 14×14 two-exit cascade takes [20]).
        **kwargs: `AdaptiveLitModule` arguments (backbone, lr, weight_decay, warm-up, init_from,
            thresholds...). Exits that feed a relationship reuse always compute explicit attention
            logits, whatever ``backbone.fused_attn`` says.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_sizes: list[int] | None = [32, 23, 16],  # noqa: B006 (jsonargparse needs a literal default)
        paddings: list[int] | None = [0, 3, 0],  # noqa: B006
        feature_reuse: bool = True,
        relation_reuse: bool = True,
        reuse_hidden: int = 128,
        reuse_dim: int = 48,
        exit_kwargs: list[dict[str, Any]] | None = None,
        reuse_upsample: list[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)

    def configure_network(self) -> DVT:
        hp = self.hparams
        return DVT.from_spec(
            self.backbone_spec, hp.num_classes, img_size=hp.img_size, patch_sizes=hp.patch_sizes,
            paddings=hp.paddings, feature_reuse=hp.feature_reuse, relation_reuse=hp.relation_reuse,
            reuse_hidden=hp.reuse_hidden, reuse_dim=hp.reuse_dim, exit_kwargs=hp.exit_kwargs,
            reuse_upsample=hp.reuse_upsample,
        )

    def compute_loss(self, output: list[Tensor], target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum of the exits' losses; each exit's loss is logged."""
        losses = [self.criterion(logits, target) for logits in output]
        logs = {f"loss_{name}": loss.detach() for name, loss in zip(self.net.exit_names, losses)}
        return sum(losses), logs

    def convert_foreign_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Tensor] | None:
        """The DVT authors' release: ``{"model_state_dict": {"less_less_token.…": …}, …}``."""
        state = checkpoint.get("model_state_dict")
        if not isinstance(state, dict) or not any(k.split(".")[0] in AUTHORS_EXITS for k in state):
            return None
        extras = authors_extras(checkpoint)
        if extras:
            rank_zero_info(extras)
        return convert_authors_checkpoint(state, self.net.state_dict())
