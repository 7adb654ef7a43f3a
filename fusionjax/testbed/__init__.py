r"""A small multi-task merging testbed on scikit-learn's handwritten digits.

It reproduces, in seconds on a CPU, the setting in which task arithmetic, TIES, DARE,
Fisher merging, RegMean and AdaMerging are evaluated (a CLIP ViT fine-tuned on eight
tasks, each with a fixed zero-shot head): one wide pretrained encoder, one copy
fine-tuned per task through that task's *fixed* head, and merges of the fine-tuned
encoders evaluated with the same heads.

**Tasks.** Eight tasks on the 1797 8x8 images of ``sklearn.datasets.load_digits``
(bundled with scikit-learn, nothing is downloaded), with one fixed 70/30 train/test split
of the images shared by all tasks: digit identity (10 classes) on images rotated by 90
degrees, mirrored, inverted and shifted by one pixel (four input domains), and parity,
``digit >= 5``, ``digit mod 3`` and ``digit is prime`` on the original images (same
inputs, conflicting groupings).

**Pretraining.** An MLP ``64 -> 512 -> 512 -> 128`` (GELU, plain ``nn.Dense`` layers) is
trained as a denoising autoencoder on the unlabelled training images under random
rotations, flips and inversions (half the pixels masked, Gaussian noise added; a linear
decoder, then discarded, reconstructs the clean view). It sees no labels and no task,
so its features are generic, "broad", and it is weak on every task.

**Heads.** Like CLIP's zero-shot heads, each task's head is fixed and is not part of the
merged parameters. Row :math:`c` is :math:`\mathrm{normalize}(\epsilon\,\hat p_c +
\sqrt{1-\epsilon^2}\,\nu_c)` with :math:`\epsilon = 0.1`: :math:`\hat p_c` is the
pretrained feature of one labelled training example of class :math:`c` (one-shot
prototype) and :math:`\nu_c` are random orthonormal directions in the 64 feature
directions the pretrained encoder barely uses (a "modality gap", as between CLIP's image
and text embeddings). Logits are ``100 * cos(features, head rows)``. The pretrained
model thus predicts like a one-shot nearest-prototype classifier with low-contrast logits,
and fine-tuning rotates features towards the head directions.

**Fine-tuning.** From the pretrained encoder, 300 steps of SGD with momentum 0.9
(learning rate 2e-3, batches of 32) on one task's cross-entropy; all layers move, the head
does not. Task vectors are 5-10% of the pretrained weights' norm. (With Adam, every
weight moves by about the learning rate, magnitudes stop tracking importance, and
magnitude trimming as in TIES falls below plain averaging; SGD keeps that signal.)

Measured over seeds 0, 1, 2 (mean test accuracy over the eight tasks): pretrained
49/52/48%, each fine-tuned model on its own task 97/97/96%, simple average 74/71/58%,
task arithmetic 75/77/70% (:math:`\lambda = 0.3`, best 77/78/73% at 0.2-0.5), TIES
(density 0.2 per tensor, :math:`\lambda = 1`) 85/83/72%. Building takes about 15 s on two
CPU cores; later loads read the cache in about a second.

**Alignment.** :mod:`fusionjax.testbed.classifiers` trains networks of one architecture
from different random initialisations on the 10-class digit task (same split), the
setting of Git Re-Basin and OTFusion.

**Logit fusion.** :mod:`fusionjax.testbed.language` holds byte-level language models on
text that ships with Python (stdlib code, pydoc documentation): a strong and a small
model pretrained on general text, small domain experts and fine-tuned strong models, the
setting of proxy-tuning, DExperts and Dynamic Logit Fusion.

Examples:
  >>> from fusionjax import testbed
  >>> tb = testbed.load(seed=0)  # doctest: +SKIP
  >>> tb.task_names[:4]  # doctest: +SKIP
  ('digits_rot90', 'digits_mirror', 'digits_invert', 'digits_shift')
  >>> logits = tb.logits(tb.finetuned[4], 4, tb.tasks[4].x_test)  # [n, 2]  # doctest: +SKIP
"""

from fusionjax.testbed import _classifiers as classifiers
from fusionjax.testbed import _language as language
from fusionjax.testbed import knowledge
from fusionjax.testbed._model import Encoder
from fusionjax.testbed._tasks import Task
from fusionjax.testbed._testbed import Testbed
from fusionjax.testbed._testbed import load
from fusionjax.testbed._train import Config

__all__ = ["Config", "Encoder", "Task", "Testbed", "classifiers", "knowledge", "language", "load"]
