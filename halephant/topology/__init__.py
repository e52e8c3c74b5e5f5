"""Cluster topology: probing every node for its role, WAL position and lag, and turning the answers into
the immutable `ClusterView`s that routing and node selection use."""
