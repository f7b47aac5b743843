"""Node pools that both the `plan` tests (test_plan.py) and the `manifests` tests (test_plan_manifests.py) give
the CLI: one on Express Connect with two CIDRs and one on the internet with a selector, as flags and as a pool
file."""

MIXED_POOLS = ["--pool", "hz=express-connect,cidr=10.20.0.0/16,cidr=10.21.0.0/16",
               "--pool", "sh=internet,cidr=192.168.30.0/24,selector-style=ack"]
MIXED_POOLS_FILE = {"pools": [
    {"name": "hz", "connectivity": "express-connect", "cidrs": ["10.20.0.0/16", "10.21.0.0/16"]},
    {"name": "sh", "connectivity": "internet", "cidrs": ["192.168.30.0/24"],
     "nodeSelector": {"alibabacloud.com/nodepool-id": "sh"}}]}
