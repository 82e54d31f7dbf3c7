"""Real models whose inference fails at run time on some inputs, built in code.

Both compute y = reshape(x, [rows, -1]) for x float32 [2, 6] and a second input
`rows` [1]: rows 1, 2, 3, 4, 6 or 12 work; rows 5 (12 values are not 5 rows) makes
the runtime raise during inference, after every check on the inputs has passed. The
probe input edged runs at load has rows = 1, so both models load on their backend.

- ONNX (Concat then Reshape, `rows` int64), written with the `onnx` package (a test
  dependency), read by OpenVINO: the case of issue 10, where a CPU infer request that
  raised answers the next identical call with its previous outputs.
- TFLite (CONCATENATION then RESHAPE, `rows` int32), written as a flatbuffer with the
  schema that ships inside `ai-edge-litert`: LiteRT raises "num_input_elements !=
  num_output_elements" from invoke, and an interpreter that raised keeps appending the
  old error to every later one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

X = np.arange(12, dtype=np.float32).reshape(2, 6)
GOOD_ROWS = (1, 2, 3, 4, 6, 12)
BAD_ROWS = 5


def reshape_inputs(rows: int, dtype: type = np.int64, x: np.ndarray = X) -> dict[str, np.ndarray]:
    return {"x": x, "rows": np.array([rows], dtype)}


def expected(rows: int, x: np.ndarray = X) -> np.ndarray:
    return x.reshape(rows, -1)


def build_reshape_onnx(directory: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rest = numpy_helper.from_array(np.array([-1], np.int64), "rest")
    graph = helper.make_graph(
        [helper.make_node("Concat", ["rows", "rest"], ["target"], axis=0),
         helper.make_node("Reshape", ["x", "target"], ["y"])],
        "reshape_rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", "c"])],
        initializer=[rest],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every OpenVINO edged supports
    onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "reshape.onnx"
    onnx.save(model, str(path))
    return path


def build_reshape_tflite(directory: Path) -> Path:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as tfl

    def tensor(name: str, shape: list[int], kind: int, buffer: int = 0, signature=None):
        t = tfl.TensorT()
        t.name, t.shape, t.type, t.buffer, t.shapeSignature = name, shape, kind, buffer, signature
        return t

    empty, minus_one = tfl.BufferT(), tfl.BufferT()
    minus_one.data = list(np.array([-1], np.int32).tobytes())
    graph = tfl.SubGraphT()
    graph.tensors = [
        tensor("x", [2, 6], tfl.TensorType.FLOAT32), tensor("rows", [1], tfl.TensorType.INT32),
        tensor("rest", [1], tfl.TensorType.INT32, buffer=1), tensor("target", [2], tfl.TensorType.INT32),
        tensor("y", [1, 12], tfl.TensorType.FLOAT32, signature=[-1, -1]),
    ]
    graph.inputs, graph.outputs = [0, 1], [4]
    concat, reshape = tfl.OperatorT(), tfl.OperatorT()
    concat.opcodeIndex, concat.inputs, concat.outputs = 0, [1, 2], [3]
    concat.builtinOptionsType = tfl.BuiltinOptions.ConcatenationOptions
    concat.builtinOptions = tfl.ConcatenationOptionsT()
    reshape.opcodeIndex, reshape.inputs, reshape.outputs = 1, [0, 3], [4]
    graph.operators = [concat, reshape]
    codes = []
    for op in (tfl.BuiltinOperator.CONCATENATION, tfl.BuiltinOperator.RESHAPE):
        code = tfl.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = op
        codes.append(code)
    model = tfl.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, codes, [graph]
    model.buffers = [empty, minus_one]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "reshape.tflite"
    path.write_bytes(bytes(builder.Output()))
    return path
