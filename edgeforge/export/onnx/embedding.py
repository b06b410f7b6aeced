"""The token embedding and the output head of an exported ONNX decoder, quantized in place to blocks that a
``GatherBlockQuantized`` (the lookup) and a ``MatMulNBits`` (the head) both read, so that a tied table is stored once.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def quantize_embedding_and_head(model: Any, bits: int, block_size: int, accuracy_level: int) -> dict[str, Any]:
    """Quantize the token embedding (``Gather``) and the output head (the ``MatMul`` producing ``logits``) in place.

    Both are stored as blocks of ``block_size`` along the hidden dimension H of the [V, H] table: ``packed`` uint8
    [V, H / block_size, block_size * bits / 8] and float scales [V, H / block_size], symmetric (no zero points).
    That is the B layout of MatMulNBits with N = V, K = H, and GatherBlockQuantized reads the same bytes as
    [V, k_blocks, block] quantized along its last axis, so a tied table is stored once. Only the scales are
    duplicated (an eighth of the uint8 table: 3.5 MB for SmolLM2), because the two ops insist on different scale
    ranks ([V, k_blocks] for MatMulNBits, the data's rank for GatherBlockQuantized).

    Returns {"embedding": ..., "lm_head": ..., "tied_embedding_shared": bool} describing what was done.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    info: dict[str, Any] = {"embedding": "float (not found)", "lm_head": "float (not found)",
                            "tied_embedding_shared": False}

    gather = next((n for n in graph.node if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == "input_ids"
                   and n.input[0] in inits and len(inits[n.input[0]].dims) == 2), None)
    table_name = gather.input[0] if gather is not None else None
    head = producers.get("logits")
    head_weight, transpose, tied = _head_weight(head, inits, producers, table_name)
    replacements: dict[int, list[Any]] = {}  # id(old node) -> new nodes, in graph order
    packed_head = None
    if head is not None and head_weight is not None:
        packed_head = _quantize_head(graph, head, head_weight, bits, block_size, accuracy_level, replacements)
        info["lm_head"] = f"int{bits} block{block_size} symmetric"
    elif head is not None:
        info["lm_head"] = f"float (its {head.op_type} has no constant or tied weight)"
    if gather is not None:
        shared = packed_head if tied else None
        info["embedding"] = _quantize_embedding(graph, gather, inits, shared, bits, block_size, replacements)
        info["tied_embedding_shared"] = shared is not None and info["embedding"].startswith("int")
    if replacements:
        _replace_nodes(model, replacements, transpose)
    return info


def _head_weight(head: Any, inits: dict[str, Any], producers: dict[str, Any],
                 table_name: str | None) -> tuple[np.ndarray | None, Any, bool]:
    """(the head's weight [K = H, N = V] as MatMul's B, or None; the Transpose of a tied head, or None; tied?).

    A tied head is ``MatMul(x, Transpose(embedding table))``: its weight is the table, transposed."""
    from onnx import numpy_helper

    if head is None or head.op_type != "MatMul":
        return None, None, False
    b_name = head.input[1]
    if b_name in inits and len(inits[b_name].dims) == 2:
        return numpy_helper.to_array(inits[b_name]), None, False
    if b_name in producers and producers[b_name].op_type == "Transpose":
        transpose = producers[b_name]
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        if transpose.input[0] == table_name and perm == [1, 0]:
            return numpy_helper.to_array(inits[table_name]).T, transpose, True
        return None, transpose, False
    return None, None, False


def _quantize_head(graph: Any, head: Any, head_weight: np.ndarray, bits: int, block_size: int,
                   accuracy_level: int, replacements: dict[int, list[Any]]) -> np.ndarray:
    """The head as a MatMulNBits over ``head_weight`` [K, N] quantized (initializers added, node replacement
    recorded); returns the packed uint8 [N, K / block, block * bits / 8] table."""
    from onnx import helper, numpy_helper

    packed_head, scales, dtype = _block_quantize(head_weight, bits, block_size)
    k, n = head_weight.shape
    q_name, s_name = f"lm_head.weight_Q{bits}", "lm_head.weight_scales"
    graph.initializer.extend([numpy_helper.from_array(packed_head, q_name),
                              numpy_helper.from_array(scales.astype(dtype), s_name)])
    replacements[id(head)] = [helper.make_node(
        "MatMulNBits", [head.input[0], q_name, s_name], list(head.output), name=f"{head.name}_Q{bits}",
        domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)]
    return packed_head


def _quantize_embedding(graph: Any, gather: Any, inits: dict[str, Any], shared_head: np.ndarray | None, bits: int,
                        block_size: int, replacements: dict[int, list[Any]]) -> str:
    """The embedding lookup as GatherBlockQuantized (+ a Reshape back to [batch, seq, H]); reads the head's packed
    table ``shared_head`` when the head is tied to it. Returns the record's description."""
    from onnx import helper, numpy_helper

    table_name = gather.input[0]
    table = numpy_helper.to_array(inits[table_name])  # [V, H]
    vocab, hidden = table.shape
    if hidden % block_size:
        return f"float (hidden size {hidden} is not a multiple of the block size {block_size})"
    if shared_head is not None:
        packed, q_name = shared_head, f"lm_head.weight_Q{bits}"
        scales = numpy_helper.to_array(next(t for t in graph.initializer if t.name == "lm_head.weight_scales"))
    else:
        packed, scales, dtype = _block_quantize(np.ascontiguousarray(table.T), bits, block_size)
        scales = scales.astype(dtype)
        q_name = f"{table_name}_Q{bits}"
        graph.initializer.append(numpy_helper.from_array(packed, q_name))
    s3_name, shape_name = f"{table_name}_scales3", f"{table_name}_hidden_shape"
    graph.initializer.extend([
        numpy_helper.from_array(scales.reshape(vocab, -1, 1), s3_name),
        # [batch, seq, k_blocks, block * bits / 8 ...] -> [batch, seq, H]; 0 copies the input's dim.
        numpy_helper.from_array(np.array([0, 0, hidden], dtype=np.int64), shape_name),
    ])
    blocks_out = gather.output[0] + "_blocks"
    replacements[id(gather)] = [
        helper.make_node("GatherBlockQuantized", [q_name, gather.input[1], s3_name], [blocks_out],
                         name=f"{gather.name}_Q{bits}", domain="com.microsoft", gather_axis=0,
                         quantize_axis=2, block_size=block_size, bits=bits),
        helper.make_node("Reshape", [blocks_out, shape_name], list(gather.output),
                         name=f"{gather.name}_Q{bits}_reshape"),
    ]
    return f"int{bits} block{block_size} symmetric"


def _replace_nodes(model: Any, replacements: dict[int, list[Any]], transpose: Any) -> None:
    """Put the new nodes in place of the old ones (graph order kept), drop the tied head's Transpose and the
    initializers nothing reads any more, and declare the com.microsoft opset."""
    import onnx

    graph = model.graph
    new_nodes = []
    for node in graph.node:
        new_nodes.extend(replacements.get(id(node), [node]))
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    used = _used_names(graph)
    if transpose is not None and not any(o in used or o in _graph_outputs(graph) for o in transpose.output):
        kept = [n for n in graph.node if n is not transpose and list(n.output) != list(transpose.output)]
        graph.ClearField("node")
        graph.node.extend(kept)
        used = _used_names(graph)
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def _block_quantize(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """Symmetric block quantization of a MatMul weight [K, N] with onnxruntime's own kernels.

    Returns packed uint8 [N, ceil(K / block), block * bits / 8], float32 scales [N, ceil(K / block)] and the
    weight's dtype (scales must be stored in it: MatMulNBits takes scales of the activations' type).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    kernel = {8: quantize_matmul_8bits, 4: quantize_matmul_4bits}[bits]
    dtype = weight.dtype
    rows, cols = weight.shape
    k_blocks = (rows + block_size - 1) // block_size
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if k_blocks * block_size != rows:
        w = np.pad(w, ((0, k_blocks * block_size - rows), (0, 0)))
    packed = np.zeros((cols, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    zero_points = np.zeros((cols, (k_blocks + 1) // 2), dtype=np.uint8)  # unused: symmetric
    kernel(packed, w, scales, zero_points, block_size, cols, rows, True)
    return packed, scales, dtype


def _used_names(graph: Any) -> set[str]:
    """Every value name read by a node of ``graph`` or of its subgraphs (If/Loop bodies), plus graph outputs."""
    names = set(_graph_outputs(graph))
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names.update(_used_names(sub))
    return names


def _graph_outputs(graph: Any) -> set[str]:
    return {o.name for o in graph.output}
