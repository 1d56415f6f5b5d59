"""Graph IR and PipeDream graph.txt I/O (see :mod:`pipeshift.graph.ir`, :mod:`pipeshift.graph.graphtxt`)."""

from pipeshift.graph.graphtxt import (
    attach_meta,
    format_graph_txt,
    meta_of,
    parse_graph_txt,
    read_graph_txt,
    read_sidecar,
    write_graph_txt,
)
from pipeshift.graph.ir import Graph, GraphError, Node

__all__ = [
    "Graph",
    "GraphError",
    "Node",
    "attach_meta",
    "format_graph_txt",
    "meta_of",
    "parse_graph_txt",
    "read_graph_txt",
    "read_sidecar",
    "write_graph_txt",
]
