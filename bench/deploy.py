"""Deploy benchmark: first deploy of 64 MiB (64 x 1 MiB random files) to 8 fake nodes, an
unchanged redeploy to 8 and to 32 nodes, and OpenSSH ``scp -r`` of the same files to the same 8
nodes as the baseline, with the ratio. Targets (issue 3): first deploy >= 1.0x scp throughput;
unchanged redeploy to 32 nodes <= 1 s.

The fake nodes (PythonSshNode) run in a separate server process, like the fake lab, so the
controller (this process) and the servers do not share a GIL, and scp (a separate process too)
is measured against the very same servers. scp is run once per node, all in parallel (what a
shell loop with ``&`` does), with OpenSSH's default cipher and with the cipher labkit
negotiates (aes128-gcm); the ratio is taken against the faster of the two.

"one file changed" is where releases that share no inode cost: each node copies the 63
unchanged MiB instead of hard-linking them. The copy runs in the kernel (FICLONE, else
copy_file_range) and a kept file is trusted by its stat against its release's seal, hashed
only when the stat does not vouch for it. Same shared 2-core machine, 8 nodes: 0.54 s with
hard links, 2.09 s with copies hashed on the node. Re-measured in one sitting with this bench
(best of 3, two runs each, load average 10-18): 2.60 / 2.24 s hashing every kept file,
1.69 / 1.41 s with kernel copies and stat seals; the stage agent alone on one node (63 kept
MiB, profiled): 0.36 s, of which 0.22 s reading, hashing and writing, against 0.17 s, of which
0.05 s in copy_file_range (ext4: no reflink). The rest is syncfs of the copies.

    .venv/bin/python bench/deploy.py [--nodes 32] [--files 64] [--file-mib 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20


# --- the node server (a child process) ------------------------------------------------------

def serve(state: Path, count: int) -> None:
    """Start ``count`` PythonSshNodes, write the inventory, print "ready", run until stdin
    closes (the bench process exiting, however it exits)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from labkit.fake.base import ensure_host_key
    from labkit.fake.sshd import PythonSshNode

    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # client resets are expected
    state.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    (state / "id_ed25519").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    (state / "id_ed25519").chmod(0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).decode()
    (state / "authorized_keys").write_text(pub + "\n")
    from labkit.fake.ports import free_port

    nodes = []
    known = []
    lines = ["nodes:"]
    for i in range(1, count + 1):
        name = f"node{i}"
        port = free_port()
        hk = state / f"{name}.host_key"
        hpub = ensure_host_key(hk)
        node = PythonSshNode(name, state / "nodes" / name, "127.0.0.1", port, hk,
                             state / "authorized_keys", logging.getLogger(name))
        node.start()
        nodes.append(node)
        known.append(f"[127.0.0.1]:{port} {hpub.get_name()} {hpub.get_base64()}")
        lines.append(f"  {name}: {{ssh: {{host: 127.0.0.1, port: {port}, key_file: "
                     f"{state / 'id_ed25519'}, known_hosts: {state / 'known_hosts'}}}}}")
    (state / "known_hosts").write_text("\n".join(known) + "\n")
    (state / "inventory.yaml").write_text("\n".join(lines) + "\n")
    print("ready", flush=True)
    sys.stdin.read()
    for n in nodes:
        n.close()


# --- the bench ------------------------------------------------------------------------------

def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def scp_all(nodes, src: Path, state: Path, cipher: str | None) -> float:
    """Parallel `scp -r` of src to every node (one scp per node), wall time."""
    procs = []
    t0 = time.perf_counter()
    for n in nodes:
        cmd = ["scp", "-r", "-q", "-B", "-o", "StrictHostKeyChecking=yes",
               "-o", f"UserKnownHostsFile={state / 'known_hosts'}", "-o", "BatchMode=yes",
               "-F", "/dev/null", "-i", str(state / "id_ed25519"), "-P", str(n.ssh.port)]
        if cipher:
            cmd += ["-c", cipher]
        target = f"scp-{cipher or 'default'}"
        cmd += [str(src), f"127.0.0.1:{target}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"scp failed: {err.decode().strip()}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=32, help="nodes for the unchanged redeploy")
    ap.add_argument("--first", type=int, default=8, help="nodes for first deploy and scp")
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--file-mib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=2,
                    help="first deploy and scp are run this many times, interleaved, and the "
                         "best of each is compared (a shared machine is noisy)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("_serve", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._serve:
        serve(Path(args._serve[1]), int(args._serve[2]))
        return 0

    from labkit import deploy as dp
    from labkit import inventory as inv
    from labkit.config import Settings

    tmp = Path(tempfile.mkdtemp(prefix="labkit-bench-deploy-"))
    os.environ["LABKIT_SSH_CONFIG"] = str(tmp / "no-ssh-config")  # ~/.ssh/config stays out
    server = subprocess.Popen([sys.executable, __file__, "_serve", str(tmp / "lab"),
                               str(max(args.nodes, args.first))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("node server did not start")
        src = tmp / "bundle"
        src.mkdir()
        size = int(args.file_mib * MIB)
        for i in range(args.files):
            (src / f"f{i:03d}.bin").write_bytes(os.urandom(size))
        total = args.files * size
        inventory = inv.load(tmp / "lab" / "inventory.yaml")
        all_nodes = list(inventory.nodes.values())
        first = all_nodes[:args.first]
        settings = Settings(parallel=max(args.nodes, args.first), progress="never")

        cache = dp.HashCache(tmp / "hash-cache.json")

        def deploy(nodes, cache=cache):
            # everything a `invoke deploy` does after parsing: read + hash the bundle, fan out
            bundle = dp.collect_bundle([src], cache=cache)
            outs = dp.Deployer(settings, bundle, build=None).run(nodes, "deploy")
            bad = [o for o in outs if not o.ok]
            if bad:
                raise SystemExit(f"deploy failed on {bad[0].node}: {bad[0].error}")
            return outs

        def wipe(nodes):
            for n in nodes:
                for sub in ("labkit", "scp-default", "scp-aes128-gcm@openssh.com"):
                    shutil.rmtree(tmp / "lab" / "nodes" / n.name / sub, ignore_errors=True)

        firsts: list[float] = []
        scp: dict[str, list[float]] = {}
        for _ in range(max(1, args.repeat)):
            wipe(first)
            # a cold hash cache each time: the first deploy reads and hashes the whole bundle
            t, outs = timed(lambda: deploy(first, dp.HashCache(tmp / "cold.json")))
            (tmp / "cold.json").unlink(missing_ok=True)
            assert all(o.value["uploaded_files"] == args.files for o in outs)
            firsts.append(t)
            if shutil.which("scp"):
                for cipher in (None, "aes128-gcm@openssh.com"):
                    scp.setdefault(cipher or "default", []).append(
                        scp_all(first, src, tmp / "lab", cipher))
        t_first = min(firsts)
        deploy(first)  # the last deploy fills the hash cache, as a user's previous run would
        t_re8, outs = timed(lambda: deploy(first))
        assert all(o.value["uploaded_files"] == 0 for o in outs)
        t_rest, _ = timed(lambda: deploy(all_nodes[args.first:args.nodes]))
        t_re32, outs = timed(lambda: deploy(all_nodes[:args.nodes]))
        assert all(o.value["uploaded_files"] == 0 for o in outs)
        ones: list[float] = []
        for _ in range(max(1, args.repeat)):
            (src / "f000.bin").write_bytes(os.urandom(size))
            t, outs = timed(lambda: deploy(first))
            assert all(o.value["uploaded_files"] == 1 for o in outs)
            ones.append(t)
        t_one = min(ones)
        scp = {k: min(v) for k, v in scp.items()}

        data = args.first * total
        rows = [
            (f"first deploy, {args.first} nodes x {total / MIB:.0f} MiB (best of {len(firsts)})",
             t_first, data / t_first / MIB),
            (f"unchanged redeploy, {args.first} nodes", t_re8, None),
            (f"first deploy, {args.nodes - args.first} more nodes", t_rest,
             (args.nodes - args.first) * total / t_rest / MIB),
            (f"unchanged redeploy, {args.nodes} nodes", t_re32, None),
            (f"one file changed, {args.first} nodes (best of {len(ones)})", t_one, None),
        ]
        for name, t in scp.items():
            rows.append((f"scp -r, {name} cipher, {args.first} in parallel (best)", t,
                         data / t / MIB))
        print(f"{'case':60} {'seconds':>8} {'MiB/s':>8}")
        for name, t, rate in rows:
            print(f"{name:60} {t:8.3f} {rate:8.1f}" if rate else f"{name:60} {t:8.3f} {'':>8}")
        result = {"first_deploy_s": t_first, "first_deploy_runs": firsts, "redeploy_8_s": t_re8, "redeploy_32_s": t_re32,
                  "one_file_s": t_one, "one_file_runs": ones, "scp_s": scp, "bytes": data}
        if scp:
            best = min(scp.values())
            ratio = best / t_first
            result["ratio_vs_scp"] = ratio
            print(f"\nfirst deploy throughput = {ratio:.2f}x scp -r (target >= 1.0x): "
                  f"{'PASS' if ratio >= 1.0 else 'FAIL'}")
        else:
            print("\nscp not installed: no baseline")
        print(f"unchanged redeploy to {args.nodes} nodes = {t_re32:.3f}s (target <= 1 s): "
              f"{'PASS' if t_re32 <= 1.0 else 'FAIL'}")
        if args.json:
            print(json.dumps(result, indent=2))
        return 0
    finally:
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
