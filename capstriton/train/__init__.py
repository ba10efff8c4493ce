"""Train a capsule network (the paper's CapsNet, Efficient-CapsNet) on MNIST: ``capstriton-train``.

    capstriton-train --data-dir data/mnist --epochs 50 --out runs/capsnet      # the paper's model
    capstriton-train --data-dir data/mnist --holdout 1000 --conv-channels 64 \\
        --primary-types 8 --decoder-hidden none --epochs 3                    # test files only
    torchrun --nproc_per_node 4 -m capstriton.train --data-dir data/mnist      # DDP, 4 GPUs

Adam with an exponentially decaying learning rate (per epoch), margin loss plus 0.0005 x the
per-image sum of squared reconstruction errors, random shifts of up to 2 pixels. Each epoch logs
loss, accuracy and throughput, evaluates, then writes into ``--out``: ``checkpoint.pt`` (model,
optimizer, scheduler, grad scaler, epoch, history, options) and ``metrics.json``, each replaced
atomically; at the end ``training_curves.png`` and ``reconstructions.png``.

``--model`` picks an entry of :data:`MODELS` (default ``capsnet``): how to build the model, the
model options it takes, and the defaults of a new run for every option that shapes the
trajectory. Giving a model option the chosen model does not take is an error.

A non-finite loss (training or test) or parameter stops the run with an error naming the epoch
(and step) before anything of that epoch is saved: the last checkpoint stays the last good one.
A checkpoint carries a sha256 digest of its content, checked on ``--resume``, so a damaged file
is an error naming it rather than a silently different model. ``--resume`` continues with the
options that shape the trajectory (:data:`TRAJECTORY_OPTIONS`, ``--model`` among them) taken
from the checkpoint; one written before ``--model`` existed resumes as ``capsnet``.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU). ``--batch-size`` is the *global* batch:
every rank draws the same shuffled order and shifts and takes its slice of each global batch,
and each rank's mean loss is weighted by its share of the batch, so the averaged gradient is
the gradient of the global batch's mean loss, and batch norm layers normalise over the global
batch (SyncBatchNorm, CUDA only: a model with batch norm is refused for multi-process runs on a
CPU): a run on W processes follows the single-process run up to floating-point reduction order.
Only rank 0 writes files and shows progress.

One module per concern: ``options`` (the command line), ``models`` (the model table),
``splits`` (the data the options select), ``distributed`` (process group, device, all-reduces),
``loop`` (the epoch, evaluation, non-finite checks), ``checkpoint`` (save, verified read,
resume), ``plots``, ``runner`` (:func:`run` and :func:`main`), ``errors``.
"""

from .errors import CheckpointError, SetupError, TrainingError
from .models import MODELS, TRAJECTORY_OPTIONS
from .options import CHECKPOINT, CURVES, METRICS, OMITTED, RECONSTRUCTIONS, build_parser, parse_args
from .runner import main, run

__all__ = [
    "SetupError",
    "CheckpointError",
    "TrainingError",
    "build_parser",
    "parse_args",
    "run",
    "main",
    "OMITTED",
    "CHECKPOINT",
    "METRICS",
    "CURVES",
    "RECONSTRUCTIONS",
    "TRAJECTORY_OPTIONS",
    "MODELS",
]
