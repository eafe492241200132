"""The out-of-distribution score of an INT8 entry, fitted on the quantised graph's own features.

:mod:`training.quantize` quantises an entry's float32 ONNX graph. When that graph also returns
``ood_score`` (its card has an ``ood`` section), the score's statistics describe the *float*
network's features, and the quantised convolutions move the features. So, for an INT8 entry:

1. the float graph is cut at the scorer's input (the averaged penultimate features: the input of
   the nodes named ``/scorer/...``), keeping the outputs ``probabilities`` and that tensor;
2. that graph is quantised (the scorer is never quantised: its distances need float precision);
3. the score is fitted again (:func:`training.ood.fit_mahalanobis`, the source card's parameters)
   on the INT8 graph's features of the training split, its threshold chosen on validation and its
   figures measured on the proxy sets, exactly as at export (:func:`training.ood_fit.measure_scores`);
4. the fitted scorer, exported to ONNX, is joined to the quantised graph
   (``onnx.compose.merge_models``): outputs ``probabilities`` and ``ood_score`` as for a float entry.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from service.card import OOD_OUTPUTS, InputSpec
from training import ood
from training.data import Dataset
from training.evaluation import onnx_image_outputs
from training.ood_fit import OPSET, TPR, collect_outputs, describe_fit
from training.ood_sets import ProxySizes, proxy_sets

SCORER_PREFIX = "/scorer/"


def scorer_input(model: Any) -> str:
    """The name of the tensor the scorer's nodes read from the rest of the graph (the features)."""
    scorer_nodes = [n for n in model.graph.node if n.name.startswith(SCORER_PREFIX)]
    if not scorer_nodes:
        raise SystemExit("the graph has no /scorer/ nodes: it returns no OOD score")
    produced = {out for n in scorer_nodes for out in n.output}
    constants = {i.name for i in model.graph.initializer}
    constants |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    found = {name for n in scorer_nodes for name in n.input if name and name not in produced and name not in constants}
    if len(found) != 1:
        raise SystemExit(f"the scorer reads {sorted(found)}, not one features tensor")
    return found.pop()


def features_graph(source: Path, target: Path) -> str:
    """Write ``source`` cut to the outputs ``probabilities`` and the scorer's input; return that
    input's name."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.shape_inference.infer_shapes(onnx.load(str(source)))  # the extractor needs the value infos
    features = scorer_input(model)
    cut = Extractor(model).extract_model([model.graph.input[0].name], ["probabilities", features])
    onnx.save(cut, str(target))
    return features


def attach_scorer(quantized: Path, features: str, scorer: torch.nn.Module, dim: int, target: Path) -> None:
    """Join ``scorer`` (features -> ood_score, exported to ONNX here) to the quantised graph's
    ``features`` output; the result's outputs are ``probabilities`` and ``ood_score``."""
    import onnx
    from onnx import compose

    scorer_path = target.with_name("scorer.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(scorer.eval(), (torch.rand(2, dim),), str(scorer_path), input_names=["features"],
                          output_names=["ood_score"], dynamic_axes={"features": {0: "batch"}, "ood_score": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    main = onnx.load(str(quantized))
    part = compose.add_prefix(onnx.load(str(scorer_path)), "scorer/", rename_inputs=False, rename_outputs=False)
    part.ir_version = main.ir_version
    domains = {o.domain: o.version for o in main.opset_import}
    for op in part.opset_import:
        if op.domain in domains and domains[op.domain] != op.version:
            op.version = domains[op.domain]
    merged = compose.merge_models(main, part, io_map=[(features, "features")],
                                  outputs=list(OOD_OUTPUTS))
    onnx.checker.check_model(merged)
    onnx.save(merged, str(target))
    scorer_path.unlink()


def refit(card_ood: dict[str, Any], features_path: Path, data: Dataset, dataset: str, spec: InputSpec,
          scale: float = 1.0, log: Callable[[str], None] = print) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The scorer fitted on ``features_path``'s features (the INT8 graph's) of the training split,
    with the source card's parameters, and its ``ood`` section measured on the INT8 graph."""
    sets = proxy_sets(dataset, spec.size, data, ProxySizes.for_dataset(dataset, scale))
    outputs = collect_outputs(lambda images: tuple(torch.from_numpy(a) for a in
                                                   onnx_image_outputs(features_path, images.numpy(), spec, threads=2)),
                              data, sets, log)
    parameters = card_ood["parameters"]
    components = parameters["components"] if parameters["components"] < parameters["feature_dim"] else None
    scorer = ood.fit_mahalanobis(outputs["train"][1], data.train.labels, int(data.train.labels.max()) + 1,
                                 components=components, residual=True, normalize=parameters["normalize"] == "l2",
                                 shrinkage=parameters["shrinkage"]).eval()
    section = describe_fit(scorer, components, outputs, sets, None)
    section["measured_by"] = ("training.quantize at quantisation: statistics fitted on the INT8 graph's own features "
                              "of the training split, threshold and figures measured on the INT8 graph")
    assert section["tpr"] == TPR
    return scorer, section
