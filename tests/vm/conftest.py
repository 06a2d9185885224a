"""tests/vm: the cgroup v2 suite, run inside the test VM (lab/vm.py).

On the host, test_vm.py boots the VM once and reports each guest test as its own result; the
guest tests themselves (guest/, and the version-agnostic host tests named in test_vm.py) are
collected only inside the guest, where lab/vm.py sets DBGUARD_VM_GUEST=1.
"""
import os

collect_ignore_glob = [] if os.environ.get("DBGUARD_VM_GUEST") else ["guest/*"]
