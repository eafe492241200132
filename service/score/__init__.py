"""Score every image in a folder: in-process (default) or through a running server (``--url``).

    python -m service.score FOLDER --model cifar10 --out predictions.csv   (.csv, .jsonl, .parquet)
    python -m service.score test1/ --model catsdogs --kaggle --out submission.csv

One row per file: relative path, label, probability of the label, one ``p_<class>`` column per class
and the model version. Labeled folders (class subfolders, or Kaggle names like ``cat.12.jpg``) also
get ``<out>.metrics.json`` (accuracy, per-class precision/recall), ``<out>.confusion.txt`` and
``<out>.confusion.png``, named from the whole output name (``p.csv.metrics.json``), so ``p.csv`` and
``p.parquet`` keep their own. Files that cannot be scored go to ``<out>.errors.csv`` with the reason
and make the exit code 1; they never stop the run. The output folder is created before scoring
starts. Outputs are replaced atomically, also on Ctrl-C (what was scored so far is kept, and
``--resume`` skips it next time). A run that cannot start (unknown model, a server that does not
answer, an output that cannot be written, ``--kaggle`` ids that repeat) ends with one ``error:``
line and exit code 2.

In-process scoring decodes in ``--workers`` processes (default ``auto``: cores - 1), each taking a
whole batch, while the model runs on the previous one; ``--workers 0`` decodes in this process.
Only what the backend and device need is imported: ONNX on a host without a CUDA driver never
imports torch.

The package, one idea a module: :mod:`~service.score.sources` (the files, their relative names
and labels, the model's folder), :mod:`~service.score.kaggle` (the submission format),
:mod:`~service.score.rows` (a scored batch and its output rows), the scorers
(:mod:`~service.score.local`, :mod:`~service.score.remote`, :mod:`~service.score.ray_data`;
each builds its batches with :mod:`service.pipeline`), :mod:`~service.score.cuda` (GPU runner and
nvJPEG), :mod:`~service.score.outputs` (output files, resume), :mod:`~service.score.metrics`
(accuracy, confusion text and PNG) and :mod:`~service.score.cli` (the command, step by step).
"""

from service.score.cli import main, make_parser, run
from service.score.cuda import GpuJpegDecoder, PinnedCudaRunner, cuda_present, resolve_device
from service.score.errors import ScoreError
from service.score.kaggle import check_kaggle_ids, kaggle_id, kaggle_rows
from service.score.local import LocalScorer
from service.score.metrics import confusion_png, confusion_text, evaluate, write_confusion
from service.score.outputs import prepare_output, read_existing, side_file, write_atomic, write_text_atomic
from service.score.ray_data import RayScorer
from service.score.remote import RemoteScorer
from service.score.rows import ScoredBatch, batch_rows
from service.score.sources import KAGGLE_NAME, LabelFinder, model_folder, relative_names, true_label, walk_files

__all__ = ["GpuJpegDecoder", "KAGGLE_NAME", "LabelFinder", "LocalScorer", "PinnedCudaRunner", "RayScorer",
           "RemoteScorer", "ScoreError", "ScoredBatch", "batch_rows", "check_kaggle_ids", "confusion_png",
           "confusion_text", "cuda_present", "evaluate", "kaggle_id", "kaggle_rows", "main", "make_parser",
           "model_folder", "prepare_output", "read_existing", "relative_names", "resolve_device", "run",
           "side_file", "true_label", "walk_files", "write_atomic", "write_confusion", "write_text_atomic"]
