"""What PipeDream (SOSP'19) reports, as data: its clusters and the Table 1 rows we can re-plan.

Everything in this module is the *paper's* figure or a stated modelling assumption; nothing here
comes from our planner. Table 1 lists, per model and cluster, the configuration PipeDream chose
("PipeDream config") and the measured epoch-time speed-up over data parallelism. Only the rows
whose model has a published profile (VGG-16, ResNet-50 and GNMT-8 in PipeDream's repository)
are kept. Table 1's GNMT-16, AlexNet, AWD-LM and S2VT rows have no published profile here.

The shipped ``gnmt/graph.txt`` is GNMT-8 (a bidirectional and three more LSTM layers in the
encoder, an attention LSTM and three more in the decoder), so its rows are Table 1's GNMT-8
rows: straight pipelines on 1×4 and 3×4 in Cluster-A, data parallelism on 2×8 in Cluster-B.
"""

from __future__ import annotations

import dataclasses

GBPS = 1e9 / 8  # bytes per second in one Gbit/s


@dataclasses.dataclass(frozen=True)
class Cluster:
    """One of the paper's clusters, with the link speeds we give the planner for it."""

    name: str
    gpus_per_server: int
    intra_bandwidth: float  # bytes/s between GPUs of one server (our assumption; see below)
    inter_bandwidth: float  # bytes/s between servers (the paper's NIC speed)
    paper_description: str
    bandwidth_note: str


CLUSTER_A = Cluster(
    name="Cluster-A",
    gpus_per_server=4,
    intra_bandwidth=10e9,
    inter_bandwidth=10 * GBPS,
    paper_description="servers of 4 V100 GPUs joined by PCIe, 10 Gbps Ethernet between servers",
    bandwidth_note=(
        "PCIe 3.0 x16 peaks at 15.75 GB/s per direction and GPU-to-GPU copies through the host bridge "
        "reach roughly 10-12 GB/s, so 10 GB/s inside a server; 10 Gbps = 1.25e9 B/s between servers "
        "(nominal, no protocol overhead)"
    ),
)

CLUSTER_B = Cluster(
    name="Cluster-B",
    gpus_per_server=8,
    intra_bandwidth=25e9,
    inter_bandwidth=25 * GBPS,
    paper_description="servers of 8 V100 GPUs joined by NVLink, 25 Gbps between servers",
    bandwidth_note=(
        "one NVLink 2.0 link carries 25 GB/s per direction; in an 8-GPU V100 server GPU pairs share one "
        "or two links and some pairs none, so one link's 25 GB/s inside a server; 25 Gbps = 3.125e9 B/s "
        "between servers (nominal)"
    ),
)


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One Table 1 row: the paper's chosen configuration and measured speed-up over DP."""

    profile: str  # directory name of the published profile
    model: str  # the paper's model name
    cluster: Cluster
    servers: int
    config: str  # the paper's notation: "15-1", "16", "straight"
    speedup_over_dp: float  # epoch-time speed-up over data parallelism, measured in the paper

    @property
    def gpus(self) -> int:
        return self.servers * self.cluster.gpus_per_server

    @property
    def shape(self) -> str:
        return f"{self.servers}×{self.cluster.gpus_per_server}"


TABLE1 = (
    PaperRow("vgg16", "VGG-16", CLUSTER_A, 4, "15-1", 5.28),
    PaperRow("vgg16", "VGG-16", CLUSTER_B, 2, "15-1", 2.98),
    PaperRow("resnet50", "ResNet-50", CLUSTER_A, 4, "16", 1.0),
    PaperRow("resnet50", "ResNet-50", CLUSTER_B, 2, "16", 1.0),
    PaperRow("gnmt", "GNMT-8", CLUSTER_A, 1, "straight", 1.5),
    PaperRow("gnmt", "GNMT-8", CLUSTER_A, 3, "straight", 2.95),
    PaperRow("gnmt", "GNMT-8", CLUSTER_B, 2, "16", 1.0),
)

PROFILES = ("vgg16", "resnet50", "gnmt")

SOURCE = (
    "PipeDream: Generalized Pipeline Parallelism for DNN Training (Narayanan et al., SOSP'19), Table 1: "
    "'PipeDream config' and the epoch-time speed-up over data parallelism"
)
