"""Tiny ONNX models with the input/output signatures insightface's ModelRouter expects, built here with the
`onnx` package (nothing is downloaded): an SCRFD-shaped detector (9 outputs: scores, boxes, 5 landmarks at strides
8/16/32, 2 anchors) whose outputs are constants placing faces where a test says, and an ArcFace-shaped recognizer
(1x3x112x112 -> embedding) that is a fixed random projection of the aligned crop."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from idfusion_pack.idfusion.faces import ARCFACE_112

DET = 64  # detector input side; insightface letterboxes every image into it
STRIDES = (8, 16, 32)
ANCHORS = 2


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def template_kps(bbox):
    """5 landmarks placed in a box like the ArcFace template in its 112x112 crop."""
    x1, y1, x2, y2 = bbox
    return np.stack([x1 + ARCFACE_112[:, 0] / 112 * (x2 - x1), y1 + ARCFACE_112[:, 1] / 112 * (y2 - y1)], 1)


def make_detector(path, faces, image_size):
    """faces: [(x1, y1, x2, y2, score)] in pixels of an image of image_size (w, h); kps from template_kps."""
    w, h = image_size
    scale = DET / max(w, h)  # insightface's letterbox scale for a square model input
    outs = {}
    for s in STRIDES:
        n = (DET // s) ** 2 * ANCHORS
        outs[s] = [np.zeros((n, 1), np.float32), np.zeros((n, 4), np.float32), np.zeros((n, 10), np.float32)]
    used = set()
    for (x1, y1, x2, y2, score) in faces:
        box = np.array([x1, y1, x2, y2]) * scale
        kps = template_kps(box)
        s = 8
        cx, cy = int(round((box[0] + box[2]) / 2 / s)), int(round((box[1] + box[3]) / 2 / s))
        i = (cy * (DET // s) + cx) * ANCHORS
        while i in used:
            i += 1
        used.add(i)
        ax, ay = cx * s, cy * s
        outs[s][0][i, 0] = score
        outs[s][1][i] = np.array([ax - box[0], ay - box[1], box[2] - ax, box[3] - ay]) / s
        outs[s][2][i] = ((kps - [ax, ay]) / s).ravel()
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nil"])]  # outputs depend on the input, trivially
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outputs = []
    for k, kind in enumerate(("score", "bbox", "kps")):
        for s in STRIDES:
            name = f"{kind}_{s}"
            arr = outs[s][k]
            inits.append(numpy_helper.from_array(arr, name + "_c"))
            nodes.append(helper.make_node("Add", [name + "_c", "nil"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET, DET])
    _save(helper.make_graph(nodes, "scrfd_test", [inp], outputs, inits), path)


def make_recognizer(path, dim=32, seed=0):
    w = np.random.default_rng(seed).standard_normal((3 * 112 * 112, dim)).astype(np.float32) / 100
    nodes = [helper.make_node("Flatten", ["input.1"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["embedding"])]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])
    _save(helper.make_graph(nodes, "arcface_test", [inp], [out], [numpy_helper.from_array(w, "W")]), path)


def make_unrecognised(path):
    """A valid ONNX model insightface does not route (50x50 input, one output)."""
    nodes = [helper.make_node("Flatten", ["x"], ["y"], axis=1)]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 50, 50])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7500])
    _save(helper.make_graph(nodes, "other", [inp], [out]), path)
