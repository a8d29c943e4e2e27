"""`MIALitModule`: MIA-Former's three training stages (docs/methods.md, "MIA-Former: training stages").

Phases (an epoch belongs to exactly one):

- ``1``  controller pretraining: blocks frozen, Adam (lr `stage1_lr`), loss
  Σ_l [(1−D_b) + mean(1−D_h) + mean(1−D_n)] on hard Gumbel straight-through masks;
- ``2``  co-training: L = CE + α·FLOPs_exec/FLOPs_total, α = ±0.1·CE/L_cost (detached), + when
  the batch's mean GFLOPs at evaluation (argmax decisions) are above `target_gflops`, − below;
  AdamW with `lr_blocks` for the backbone and `lr_controller` for the controllers;
- ``3a`` A2C, agent only: the controllers (actors = FC_b/FC_h2/FC_n, plus their critics) learn
  from R = 1[correct] ± β·(target − exec)/total (+ above the target, − below), everything
  else frozen;
- ``3j`` A2C, joint: as 3a, and the blocks learn the task loss under the sampled policies.

`stage` picks the first stage; `stage_epochs` = [e1, e2, e3_agent, e3_joint] runs the stages
from `stage` on inside one `fit`, switching (and re-creating the optimiser) at epoch
boundaries. Without `stage_epochs` a run is the single stage `stage` for all its epochs (stage 3:
`agent_epochs` agent-only epochs first). `init_from` starts a stage from an earlier stage's
checkpoint, or stage 1 (or 2) from a `StaticViTLitModule` checkpoint (controllers built fresh).
Entering stage 3 from weights that never had it re-initialises each controller weight entry with
probability 1 − `inherit_fraction` and the critics entirely (the paper's 75 % inheritance).

Note: a pipeline run changes which parameters train at stage boundaries; under DDP use
``strategy: ddp_find_unused_parameters_true`` for it (single-stage runs work with plain ddp).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from adaptive_vit.backbones import build_backbone
from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.methods.mia.controller import MIAController
from adaptive_vit.methods.mia.model import DIMENSIONS, Decisions, MaskedOutput, MIAFormer

PHASES = ("1", "2", "3a", "3j")


class PolicyTerm(NamedTuple):
    """One kind of decision of one block, for A2C."""

    logits: Tensor  # (B, k, 2)
    actions: Tensor  # (B, k) 0/1
    values: Tensor  # (B, k) critic values
    weight: Tensor  # (B, k) 1 where the decision was actually taken (its block executed)


class MIALitModule(AdaptiveLitModule):
    """MIA-Former on a backbone (timm ViT, LeViT), trained in three stages.

    Args:
        skip_blocks: let the controllers skip blocks (the paper's Table 2 ablation switches).
        skip_heads: let them skip heads.
        skip_tokens: let them skip tokens.
        controller_pool: side of the pooled map the controllers' CNN reads.
        token_global: concatenate a pooled global feature in the token branch.
        stage: first (or only) stage to run: 1, 2 or 3.
        stage_epochs: [e1, e2, e3_agent, e3_joint] to run the stages from `stage` on in one fit
            (trainer.max_epochs must equal their sum); None runs `stage` alone.
        agent_epochs: stage 3 alone: agent-only epochs before the joint ones.
        target_gflops: FLOPs_target, GFLOPs per image.
        stage1_lr: Adam learning rate of stage 1.
        lr_blocks: AdamW peak learning rate of the backbone (stages 2-3).
        lr_controller: AdamW peak learning rate of the controllers (stages 2-3).
        cost_ratio: |α|·L_cost as a fraction of the task loss (paper: 0.1).
        inherit_fraction: fraction of controller weight entries kept when stage 3 starts.
        reward_beta: β of the reward, on (target − exec)/total.
        entropy_weight: weight of the entropy bonus (A2C).
        critic_weight: weight of the critic's MSE (A2C).
        gumbel_tau: Gumbel-softmax temperature.
        **kwargs: `AdaptiveLitModule` arguments (backbone, weight_decay, warm-up, init_from, ...);
            its `lr` is unused (the stages have their own).
    """

    def __init__(
        self,
        skip_blocks: bool = True,
        skip_heads: bool = True,
        skip_tokens: bool = True,
        controller_pool: int = 4,
        token_global: bool = True,
        stage: int = 1,
        stage_epochs: list[int] | None = None,
        agent_epochs: int = 20,
        target_gflops: float = 3.9,
        stage1_lr: float = 1e-4,
        lr_blocks: float = 1e-5,
        lr_controller: float = 1e-3,
        cost_ratio: float = 0.1,
        inherit_fraction: float = 0.75,
        reward_beta: float = 1.0,
        entropy_weight: float = 0.01,
        critic_weight: float = 0.5,
        gumbel_tau: float = 1.0,
        **kwargs,
    ) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3 (got {stage}).")
        if stage_epochs is not None and (len(stage_epochs) != 4 or min(stage_epochs) < 0):
            raise ValueError(
                f"stage_epochs must be 4 non-negative epoch counts [stage1, stage2, stage3_agent, "
                f"stage3_joint], got {stage_epochs}."
            )
        if not 0.0 <= inherit_fraction <= 1.0:
            raise ValueError(f"inherit_fraction must be in [0, 1] (got {inherit_fraction}).")
        if target_gflops <= 0:
            raise ValueError(
                f"target_gflops must be positive, got {target_gflops}: the mean GFLOPs per image the policy "
                "aims at, below the all-on cost that `adaptive-vit flops --config ...` reports."
            )
        super().__init__(**kwargs)
        self.phase: str | None = None
        self.enter_phase(self.schedule()[0][0])

    def configure_network(self) -> MIAFormer:
        hp = self.hparams
        return MIAFormer(
            build_backbone(self.backbone_spec, hp.num_classes)[0], skip_blocks=hp.skip_blocks, skip_heads=hp.skip_heads,
            skip_tokens=hp.skip_tokens, pool=hp.controller_pool, token_global=hp.token_global,
            gumbel_tau=hp.gumbel_tau,
        )

    # ------------------------------------------------------------------ stages

    def schedule(self) -> list[tuple[str, int | None]]:
        """(phase, epochs) in order; None = until the end of the fit."""
        hp = self.hparams
        if hp.stage_epochs is not None:
            first = {1: 0, 2: 1, 3: 2}[hp.stage]
            phases = [(p, e) for p, e in list(zip(PHASES, hp.stage_epochs))[first:] if e > 0]
            if not phases:
                raise ValueError(f"stage_epochs {hp.stage_epochs} runs no epoch from stage {hp.stage} on.")
            return phases
        if hp.stage == 3:
            return [("3a", hp.agent_epochs), ("3j", None)] if hp.agent_epochs else [("3j", None)]
        return [(str(hp.stage), None)]

    def phase_at(self, epoch: int) -> str:
        start = 0
        for phase, epochs in self.schedule():
            if epochs is None or epoch < start + epochs:
                return phase
            start += epochs
        return self.schedule()[-1][0]

    def _phase_epochs(self, phase: str) -> tuple[int, int]:
        """(first epoch, epoch count) of a phase in this fit."""
        start = 0
        for p, epochs in self.schedule():
            if p == phase:
                return start, (epochs if epochs is not None else max(1, self.trainer.max_epochs - start))
            start += epochs or 0
        raise ValueError(f"phase {phase} is not in this run's schedule {self.schedule()}.")

    def enter_phase(self, phase: str) -> None:
        """Choose how training decides, freeze/unfreeze, and (entering stage 3) inherit weights."""
        net = self.net
        if phase.startswith("3") and not bool(net.policy_initialised):
            # a fixed seed: every DDP rank re-initialises the same entries (no broadcast mid-fit)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                for controller in net.controllers:
                    inherit_weights(controller, self.hparams.inherit_fraction)
            net.policy_initialised.fill_(True)
        net.train_decisions = "sample" if phase.startswith("3") else "gumbel"
        net.isolate_controllers = phase == "1"
        self.phase = phase
        self._freeze()

    def _freeze(self) -> None:
        """Blocks train in phases 2 and 3j; controllers always; critics only in stage 3."""
        self.net.backbone.requires_grad_(self.phase in ("2", "3j"))
        for controller in self.net.controllers:
            controller.requires_grad_(True)
            for critic in controller.critics():
                critic.requires_grad_(self.phase.startswith("3"))

    def setup(self, stage: str) -> None:
        # DDP registers only the parameters that require grad when it wraps the model: a pipeline
        # that unfreezes the blocks later needs them all registered. Everything is trainable at
        # wrap time and frozen again at train start (find_unused_parameters skips frozen ones).
        if stage == "fit" and len(self.schedule()) > 1 and self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            # Plain DDP would stop at the first phase switch with a RuntimeError about unused
            # parameters. Private `_ddp_kwargs`: Lightning (2.6) has no public accessor for the DDP
            # arguments, and the wrapped `DistributedDataParallel.find_unused_parameters` only
            # exists once the strategy has wrapped the model, after this hook. test_ddp's MIA
            # pipeline reads it under the pinned Lightning, so a rename fails there first.
            if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters"):
                raise ValueError(
                    "MIA-Former runs that switch phases (stage_epochs, or stage 3 with agent_epochs > 0) "
                    "freeze and unfreeze parameters, which DDP refuses unless it looks for unused "
                    "ones: use --trainer.strategy ddp_find_unused_parameters_true (or run one phase "
                    "per fit)."
                )
            self.net.requires_grad_(True)

    def on_train_start(self) -> None:
        self._freeze()

    def on_fit_start(self) -> None:
        total = sum(e for _, e in self.schedule() if e is not None)
        if self.hparams.stage_epochs is not None and self.trainer.max_epochs != total:
            raise ValueError(
                f"stage_epochs {self.hparams.stage_epochs} from stage {self.hparams.stage} make "
                f"{total} epochs but trainer.max_epochs is {self.trainer.max_epochs}: set "
                f"--trainer.max_epochs {total} (or change stage_epochs)."
            )

    def on_train_epoch_start(self) -> None:
        phase = self.phase_at(self.current_epoch)
        if phase != self.phase:
            if self.phase == "1":
                self._check_stage1_finished()
            self.enter_phase(phase)
            self.trainer.strategy.setup_optimizers(self.trainer)  # the new phase's optimiser
        # 1, 2, 3 (stage 3 agent-only), 4 (stage 3 joint)
        self.log("train/phase", float(PHASES.index(self.phase) + 1), on_epoch=True, on_step=False)

    def on_fit_end(self) -> None:
        if self.phase == "1":
            self._check_stage1_finished()

    def _check_stage1_finished(self) -> None:
        """Stage 1 ends when nothing is skipped and the model equals its backbone (docs/methods.md):
        warn if the last validation still skipped work, since stage 2 would then start below the
        backbone's accuracy (measured on the demo: docs/performance.md, MIA-Former: demo accuracy)."""
        validated = self.trainer.callback_metrics.get("val/gflops")
        all_on = self.net.exit_gflops()[0]
        if validated is not None and float(validated) < all_on * (1 - 1e-3):
            rank_zero_warn(
                f"MIA-Former: stage 1 ended with the controllers still skipping work at validation "
                f"({float(validated):.4g} of {all_on:.4g} GFLOPs with everything on): the model is not yet "
                "its backbone. Give stage 1 more epochs (stage_epochs[0]) or a higher stage1_lr."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["adaptive_vit"]["mia_phase"] = self.phase

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        phase = checkpoint.get("adaptive_vit", {}).get("mia_phase")
        if phase and phase != self.phase:  # resuming: the optimiser state is this phase's
            self.enter_phase(phase)

    # ------------------------------------------------------------------ optimisers

    def param_groups(self) -> list[dict[str, Any]]:
        hp = self.hparams
        return [
            {"params": list(self.net.backbone.named_parameters()), "lr": hp.lr_blocks},
            {"params": list(self.net.controllers.named_parameters()), "lr": hp.lr_controller},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        if self.phase != "1":
            return super().configure_optimizers()  # AdamW, per-group lr, warm-up + cosine
        params = [p for p in self.net.controllers.parameters() if p.requires_grad]
        return {"optimizer": torch.optim.Adam(params, lr=self.hparams.stage1_lr)}  # the paper's stage 1

    def _lr_factor(self, peak: float, warmup: int, total: int):
        # the cosine spans the current phase, not the whole fit
        _, epochs = self._phase_epochs(self.phase)
        per_epoch = self.trainer.estimated_stepping_batches / max(1, self.trainer.max_epochs or 1)
        return super()._lr_factor(peak, warmup, max(1, int(epochs * per_epoch)))

    # ------------------------------------------------------------------ losses

    def compute_loss(self, output: MaskedOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logs = self._decision_logs(output)
        gflops = output.gflops.mean()
        logs.update(mean_gflops=gflops.detach(), target_gflops=gflops.new_tensor(self.hparams.target_gflops))
        if self.phase == "1":
            loss = pretrain_loss(self.net.kept_fractions(output.decisions))
            logs["pretrain_loss"] = loss.detach()
            return loss, logs
        if self.phase == "2":
            task = self.criterion(output.logits, target)
            cost = gflops / self.net.exit_gflops()[0]  # L_cost = FLOPs_exec / FLOPs_total
            alpha = self.hparams.cost_ratio * task.detach() / cost.detach().clamp(min=1e-8)
            alpha = alpha if self._above_target(output) else -alpha
            logs.update(task_loss=task.detach(), cost_loss=cost.detach(), alpha=alpha.detach())
            return task + alpha * cost, logs
        reward = self.reward(output, target)
        actor, critic, entropy = a2c_losses(policy_terms(output), reward)
        loss = actor + self.hparams.critic_weight * critic - self.hparams.entropy_weight * entropy
        logs.update(reward=reward.mean(), actor_loss=actor.detach(), critic_loss=critic.detach(),
                    entropy=entropy.detach())
        if self.phase == "3j":  # the blocks learn the task under the sampled policies
            task = self.criterion(output.logits, target)
            logs["task_loss"] = task.detach()
            loss = loss + task
        return loss, logs

    def _above_target(self, output: MaskedOutput) -> bool:
        """Whether this batch would execute more than the target at evaluation: the mean cost of
        the controllers' argmax decisions, not of the decisions sampled for training.

        Deviation from the paper, which compares the executed (sampled) cost: measured on the
        demo, co-training then held the sampled cost on the target (0.0111 for 0.011 GFLOPs)
        while evaluation, which takes the argmax, ran 3-14 % above it (0.0113-0.0125 over five
        epochs); docs/methods.md, MIA-Former: training stages.
        """
        return output.argmax_gflops.mean().item() > self.hparams.target_gflops

    def reward(self, output: MaskedOutput, target: Tensor) -> Tensor:
        """R = 1[correct] ± β·(FLOPs_target − FLOPs_exec)/FLOPs_total per image (no gradient),
        + while the batch is above the target (`_above_target`), − below it.

        Deviation from the paper's R = Y + β·(FLOPs_target − FLOPs_exec): its cost term rewards
        any saving, also below the target, so the policy keeps cutting (on the demo stage 3 ended
        at 0.0075 GFLOPs for a target of 0.011). With the sign switched as stage 2 switches α,
        the β term pushes the cost towards the target from either side; images still differ in
        what they execute, so the policy stays input-adaptive.
        """
        labels = target.argmax(-1) if target.is_floating_point() else target
        correct = (output.logits.argmax(-1) == labels).float()
        total = self.net.exit_gflops()[0]
        sign = 1.0 if self._above_target(output) else -1.0
        saving = (self.hparams.target_gflops - output.gflops) / total
        return (correct + sign * self.hparams.reward_beta * saving).detach()

    def _decision_logs(self, output: MaskedOutput) -> dict[str, Tensor]:
        """Mean skip ratios (scalars, logged) and, for `FlopsBudgetTracker`, per-image GFLOPs and
        per-block kept fractions ``decisions/<kind>`` (B, L), heads and tokens counted only
        where the block executed."""
        d = self.net.kept_fractions(output.decisions)
        executed = d.blocks.detach()  # (B, L)
        kept = {
            "blocks": executed,
            "heads": executed * d.heads.detach(),
            "tokens": executed * d.tokens.detach(),
        }
        logs = {"gflops": output.gflops.detach()}
        for dim in DIMENSIONS:
            logs[f"skip_{dim}"] = 1 - kept[dim].mean()
            logs[f"decisions/{dim}"] = kept[dim]
        return logs

    # ------------------------------------------------------------------ weights

    def accepts_checkpoint_of(self, method: str) -> bool:
        return method == "StaticViTLitModule"  # its `backbone.*` is this network's backbone

    def may_be_missing(self, key: str) -> bool:
        # starting from a static model: the controllers (and the stage-3 marker) are new
        return key.startswith("controllers.") or key == "policy_initialised"


def pretrain_loss(kept: Decisions) -> Tensor:
    """Stage 1: Σ_l [(1 − D_b) + mean(1 − D_h) + mean(1 − D_n)], averaged over the batch, from
    the (B, L) kept fractions (`MIAFormer.kept_fractions`; switched-off dimensions are all ones
    and add nothing)."""
    per_block = (1 - kept.blocks) + (1 - kept.heads) + (1 - kept.tokens)  # (B, L)
    return per_block.sum(1).mean()


def policy_terms(output: MaskedOutput) -> list[PolicyTerm]:
    """Every decision kind of every block with its logits, sampled actions and critic values.
    Head and token decisions count only for images that executed the block."""
    d = output.decisions
    terms = []
    for l, control in enumerate(output.controls):
        executed = d.blocks[:, l].detach()
        if control.block is not None:
            terms.append(PolicyTerm(control.block[:, None], d.blocks[:, l, None], control.values["block"][:, None],
                                    torch.ones_like(executed)[:, None]))
        if control.heads is not None:  # the block's own heads and tokens (rows are padded)
            heads = d.heads[:, l, :control.heads.shape[1]]
            terms.append(PolicyTerm(control.heads, heads, control.values["heads"], executed[:, None].expand_as(heads)))
        if control.tokens is not None:
            tokens = d.tokens[:, l, :control.tokens.shape[1]]
            terms.append(PolicyTerm(control.tokens, tokens, control.values["tokens"], executed[:, None].expand_as(tokens)))
    return terms


def a2c_losses(terms: list[PolicyTerm], reward: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(actor, critic, entropy), each a mean over the decisions actually taken, then over terms.

    Actor: −log π(a)·(R − V) with V detached; critic: (V − R)²; entropy of π (a bonus).

    Args:
        terms: from `policy_terms`.
        reward: (B,) per-image reward, no gradient.
    """
    actor, critic, entropy = [], [], []
    for term in terms:
        log_probs = F.log_softmax(term.logits.float(), dim=-1)  # (B, k, 2)
        taken = log_probs.gather(-1, term.actions.long()[..., None])[..., 0]
        advantage = reward[:, None] - term.values.detach()
        weight, count = term.weight, term.weight.sum().clamp(min=1)
        actor.append(-(weight * taken * advantage).sum() / count)
        critic.append((weight * (term.values - reward[:, None]) ** 2).sum() / count)
        entropy.append((weight * -(log_probs.exp() * log_probs).sum(-1)).sum() / count)
    if not terms:
        zero = reward.new_zeros(())
        return zero, zero, zero
    return torch.stack(actor).mean(), torch.stack(critic).mean(), torch.stack(entropy).mean()


def inherit_weights(controller: MIAController, fraction: float) -> None:
    """Keep each controller weight entry with probability `fraction`, re-initialise the others
    (from a freshly initialised controller of the same shape); the critics start fresh."""
    fresh = controller.fresh()
    critics = {id(p) for c in controller.critics() for p in c.parameters()}
    with torch.no_grad():
        for param, new in zip(controller.parameters(), fresh.parameters()):
            if id(param) in critics:
                param.copy_(new)
                continue
            keep = torch.rand(param.shape) < fraction
            param.copy_(torch.where(keep.to(param.device), param, new.to(param.dtype)))
