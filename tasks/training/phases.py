"""What trains in each phase: `head_phase` (phase 1) and `finetune_phase` (phase 2), each a `Phase`.

Without augmentation, what the frozen part of the network computes is computed once per image (and
kept across runs, tasks.training.features) and only the trained part runs each step.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

from tasks.lib.image_cache import MappedImages
from tasks.lib.models import feature_extractor, head_module
from tasks.training.batches import Batch
from tasks.training.cuda_graph import graph_for
from tasks.training.features import cached_features, context_key
from tasks.training.freezing import set_train_mode, set_trainable, split_frozen_prefix
from tasks.training.loop import Phase, Run, amp_logits, cached_batch, fp32_logits, image_batch, predict, predict_cached
from tasks.training.optim import make_optimizer, maybe_compile
from tasks.training.runtime import Runtime, wrap_ddp

log = logging.getLogger(__name__)


def head_phase(run: Run, cache_features: bool | None = None) -> Phase:
    """Backbone frozen and in eval mode; only the head trains, on cached backbone features unless the phase
    augments or cache_features is False. A head that is not one Linear (SqueezeNet's) runs the whole model."""
    cfg, model, prog = run.cfg, run.model, run.progress
    set_trainable(model, "none")
    head = head_module(model)
    model.eval()    # BatchNorm statistics and dropout stay as pretrained
    linear = isinstance(head, nn.Linear)
    cache = linear and (not cfg.head.augment if cache_features is None else cache_features)
    optimizer = make_optimizer(cfg, [{"params": list(head.parameters()), "lr": cfg.head.lr}])
    trained = wrap_ddp(head if linear else model, run.rt)
    if not linear:
        return Phase("head", partial(amp_logits, trained, run.rt), optimizer, partial(image_batch, run),
                     partial(predict, run, model, run.data.val_x), model.eval)
    elif not cache:
        extractor = maybe_compile(feature_extractor(model).eval(), cfg)
        return Phase("head", partial(frozen_then_head, extractor, trained, run.rt), optimizer,
                     partial(image_batch, run), partial(predict, run, model, run.data.val_x), model.eval)
    else:
        done = prog.phase_stopped or prog.epochs_done >= cfg.head.epochs
        extractor = maybe_compile(feature_extractor(model).eval(), cfg)
        empty = torch.empty(0, device=run.rt.device)
        train_feats = empty if done else features(run, extractor, run.data.train_eval, "features train")
        val_feats = empty if done else features(run, extractor, run.data.val_x, "features val")
        # Features and labels stay on the device; on CUDA the step is a graph replay.
        optimizer, graph = graph_for(optimizer, run.rt, cfg.cuda_graphs)
        return Phase("head", partial(fp32_logits, trained), optimizer,
                     partial(cached_batch, train_feats, run.data.train_y.to(run.rt.device)),
                     partial(predict_cached, head, val_feats, run.rt), model.eval, graph)


def frozen_then_head(extractor: nn.Module, head: nn.Module, rt: Runtime, batch: Batch) -> torch.Tensor:
    """The head on features the frozen backbone computes now, without gradients."""
    with torch.no_grad(), rt.autocast():
        feats = extractor(batch.x).float()
    return head(feats)


def features(run: Run, extractor: nn.Module, images: MappedImages, desc: str) -> torch.Tensor:
    """`extractor`'s outputs for every image, the unchanged ones' from the feature cache when it is set."""
    compute = partial(predict, run, extractor)
    if not images.keys or run.features_dir is None:
        return compute(images, desc)
    return cached_features(compute, images, feature_context(run, extractor, images.pixels), run.features_dir,
                           run.rt, desc)


def feature_context(run: Run, extractor: nn.Module, pixels: str) -> str:
    """The feature cache's key for all but the image: the extractor, the pixels' recipe, the device's preprocessing."""
    rt, data = run.rt, run.data
    recipe = (f"{pixels}/{data.mean.tolist()}/{data.std.tolist()}/{run.cfg.image_size}/{run.cfg.channels_last}/"
              f"{rt.device.type}/{rt.amp_dtype}/{torch.__version__}")
    return context_key(extractor, recipe)


def finetune_phase(run: Run, cache_activations: bool | None = None) -> Phase:
    """Unfreeze per train.finetune.unfreeze; head at lr, backbone at lr * backbone_lr_scale. Without
    augmentation (and unless cache_activations is False) only the unfrozen top trains, on cached activations
    of the frozen bottom: the same model and loss, at the cost of the top alone."""
    cfg, ft, model = run.cfg, run.cfg.finetune, run.model
    first = set_trainable(model, ft.unfreeze, ft.last_n)
    head_ids = {id(p) for p in head_module(model).parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = make_optimizer(cfg, [{"params": list(head_module(model).parameters()), "lr": ft.lr},
                                     {"params": backbone, "lr": ft.lr * ft.backbone_lr_scale}])
    log.info("phase 2: %d of %d parameter tensors train", sum(p.requires_grad for p in model.parameters()),
             sum(1 for _ in model.parameters()))
    train_mode = partial(set_train_mode, model, run.pretrained and ft.batchnorm == "frozen")
    cache = not ft.augment and bool(first) and cache_activations is not False
    split = split_frozen_prefix(model, first[0], cfg.image_size) if cache else None
    if split is None:
        trained = wrap_ddp(maybe_compile(model, cfg), run.rt)
        return Phase("finetune", partial(amp_logits, trained, run.rt), optimizer, partial(image_batch, run),
                     partial(predict, run, model, run.data.val_x), train_mode)
    else:
        lower, upper = split
        train_acts = features(run, lower, run.data.train_eval, "activations train")
        val_acts = features(run, lower, run.data.val_x, "activations val")
        log.info("phase 2 trains from %s on cached activations of shape %s", first[0], tuple(train_acts.shape[1:]))
        trained = wrap_ddp(maybe_compile(upper, cfg), run.rt)
        optimizer, graph = graph_for(optimizer, run.rt, cfg.cuda_graphs)
        return Phase("finetune", partial(fp32_logits, trained), optimizer,
                     partial(cached_batch, train_acts, run.data.train_y.to(run.rt.device)),
                     partial(predict_cached, upper, val_acts, run.rt), train_mode, graph)
