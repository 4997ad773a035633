#!/bin/sh
# Deploy's read-only probe of a node: probe.sh WORKDIR
#
# What an unchanged redeploy costs per node, so it is plain sh + find (POSIX): a shell starts in
# a few ms where even `python3 -I -S` with json costs tens, and across 32 nodes on a small
# controller that is the difference between well under and over a second. It changes nothing
# (leftovers are removed under the lock by stage.py). Output, parsed by
# labkit.deploy.plan.parse_sh_probe:
#   @leftover NAME              a half-assembled release or a stray temp symlink
#   @release KEY ID             KEY (current|previous) points at releases/ID
#   @manifest KEY ... @end      that release's MANIFEST
#   @new KEY  ./path...         files written or changed after the release's .labkit-stat
#                               marker, i.e. edited on the node after it was built (@nostat
#                               KEY: no marker). By ctime too where find has -cnewer: an edit
#                               that puts size and mtime back cannot put the ctime back. Both
#                               tests are strict and timestamps come in ticks, so stage.py
#                               switches to a release only once the file clock has passed its
#                               marker: an edit in the marker's own tick is newer all the same.
#   @files KEY ./path...        every file of the release
#   @done                       the output is complete
W=$1
C=
case $W in "~/"*) W="$HOME/${W#\~/}";; esac
cd "$W/payloads" 2>/dev/null || exit 0
for f in releases/.incoming-* .*.tmp-*; do
  if [ -e "$f" ] || [ -L "$f" ]; then echo "@leftover ${f#releases/}"; fi
done
for k in current previous; do
  t=$(readlink "$k" 2>/dev/null) || continue
  r=${t##*/}
  echo "@release $k $r"
  d="releases/$r"
  [ -d "$d" ] || continue
  if [ -f "$d/MANIFEST" ]; then echo "@manifest $k"; cat "$d/MANIFEST"; echo; echo "@end"; fi
  if [ -f "$d/.labkit-stat" ]; then
    echo "@new $k"
    if [ -z "$C" ]; then
      C=-newer; find "$d/.labkit-stat" -cnewer "$d/.labkit-stat" >/dev/null 2>&1 && C=-cnewer
    fi
    (cd "$d" && find . -type f \( -newer .labkit-stat -o $C .labkit-stat \))
  else
    echo "@nostat $k"
  fi
  echo "@files $k"; (cd "$d" && find . -type f)
done
echo "@done"
