"""Generated gRPC code for package ``embcomp.v1``: do not edit; run scripts/gen_proto.py.

Sources: proto/embcomp/v1/*.proto.
"""
