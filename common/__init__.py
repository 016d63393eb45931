"""Code every llmesh process shares; it imports no server and not the SDK.

Errors and their status table, the etcd key layout and access layer, the gRPC server harness,
tracing, the routing selector, the worker session and process helpers.
"""
