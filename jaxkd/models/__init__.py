"""Models for jaxkd as pure functions: ``create_model(name, num_classes) -> ModelFns``.

::

    fns = create_model("resnet8x4", num_classes=100)
    variables = fns.init(jax.random.key(0), x)          # {"params", "batch_stats"}
    logits, feats, state = fns.apply(variables, x, train=True)
    variables = {"params": variables["params"], **state}

All models are Flax Linen, NHWC, float32 by default (``dtype=`` sets the computation dtype,
parameters stay float32, logits come back float32). Layouts and their sources are in the
docstrings of :mod:`~jaxkd.models.resnet` (RepDistiller CIFAR ResNets),
:mod:`~jaxkd.models.wrn` (RepDistiller WRNs), :mod:`~jaxkd.models.small` (CNN, MLP) and
:mod:`~jaxkd.models.transformer` (ViT / BERT-style encoder).

Feature taps (``features`` returned by ``apply``); shapes for a 32x32 input to the CIFAR
models, a 28x28x1 input to ``cnn`` (``w = width``):

=============== ============================ ============================ =======================
tap             resnet*, resnet*x4           wrn_*                        cnn / mlp
=============== ============================ ============================ =======================
stem            conv+BN+ReLU, 32x32xw0       stem conv (no BN), 32x32x16  --
stage1          block out after ReLU, 32x32  raw stage output, 32x32x16k  cnn: 14x14xw after ReLU
stage2          same, 16x16                  same, 16x16x32k              cnn: 7x7x2w after ReLU
stage3          same, 8x8                    same, 8x8x64k                --
stage1_pre      last block's sum, pre-ReLU   next block's bn1(stage1)     cnn: pooled BN, pre-ReLU
stage2_pre      same                         next block's bn1(stage2)     cnn: same
stage3_pre      same                         head BN(stage3)              --
hidden1..K      --                           --                           mlp: hidden activations
embedding       pooled stage3 (w3)           pooled relu(head BN) (64k)   cnn: hidden dense out;
                                                                          mlp: last hidden
logits          classifier output            classifier output            classifier output
=============== ============================ ============================ =======================

The ``*_pre`` taps are RepDistiller's ``preact=True`` features (used e.g. by AB distillation);
the others its ``preact=False`` list ``[f0, f1, f2, f3, f4]`` by position. In a
pre-activation WRN a stage's output is the un-normalised residual stream, and "pre-activation"
means the next layer's BN output before its ReLU (see :mod:`~jaxkd.models.wrn`).

Transformer taps (:mod:`~jaxkd.models.transformer`; ``L`` tokens = patches or ids, plus one
for [CLS] when ``pool="cls"``; ``h`` heads of size ``d_h = D / h``; blocks ``i = 0..N-1``):

======================== ================== ================================================
tap                      shape              meaning
======================== ================== ================================================
embeddings               ``[B, L, D]``      input of block 0 (position embeddings, [CLS])
layer{i}/hidden          ``[B, L, D]``      output of block i (pre-LN residual stream)
layer{i}/q, k, v         ``[B, h, L, d_h]`` per-head queries, keys, values
layer{i}/attn_scores     ``[B, h, L, L]``   ``q k^T / sqrt(d_h)`` + mask bias (-10000 at
                                            padded keys), before softmax; float32
layer{i}/attn_probs      ``[B, h, L, L]``   softmax of the scores over keys; float32
token_mask               ``[B, L]``         1.0 real token (and [CLS]), 0.0 padding
embedding                ``[B, D]``         pooled ([CLS] or masked mean) after the final LN
logits                   ``[B, C]``         classifier output
======================== ================== ================================================

Registered names (:func:`list_models`): ``resnet`` (generic, ``depth=6n+2``, ``widths``),
``resnet8/14/20/32/44/56/110`` (widths 16/16/32/64), ``resnet8x4``, ``resnet32x4`` (widths
32/64/128/256), ``wrn`` (generic, ``depth=6n+4``, ``widen_factor``), ``wrn_16_1``,
``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``, ``wrn_28_4``, ``cnn``, ``mlp``, ``transformer``
(generic: ``num_layers``, ``dim``, ``num_heads`` and ``patch_size`` or ``vocab_size``), the
patch models ``vit_teacher`` (6 layers, D=256, 8 heads), ``vit_student`` (3, 128, 8),
``vit_student2`` (2, 128, 8) (``patch_size`` default ``(4, 4)``) and the token models
``seq_teacher``, ``seq_student``, ``seq_student2`` of the same sizes (``vocab_size`` required).

Models written elsewhere plug in through :func:`from_linen` (a Linen module whose
``__call__(x, train)`` returns logits or ``(logits, features)``) and :func:`from_nnx` (an NNX
module; its variables come back as ``{"params", "model_state"}``).
"""

from jaxkd.models.base import ModelFns, count_params, from_linen
from jaxkd.models.nnx_adapter import from_nnx
from jaxkd.models.registry import create_model, list_models, register_model

__all__ = ["ModelFns", "count_params", "create_model", "from_linen", "from_nnx", "list_models",
           "register_model"]
