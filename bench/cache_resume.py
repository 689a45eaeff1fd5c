#!/usr/bin/env python3
"""Carries a pipeline's finished stages from one device machine to the next.

A device machine goes back 30 s after a call ends, and a lease's long job (bench/gpu_speedrun.sh)
dies with it. dmdpipe's cache is content-addressed (`entries/<key>.json` naming the digest of an
output tree in `objects/<tree>/`, each file's digest checked before a hit is taken), so finished
stages copied into a fresh machine's cache are hits there, and the run goes on from the first
stage that was not finished.

  pack CACHE OUT --sent FILE [--cap-mb 56] [--min-seconds 30] [--max-object-mb 200] [--part-mb 15]
      (device machine, in each poll) Writes into OUT the files of finished stages worth carrying
      (they ran at least --min-seconds and their outputs are at most --max-object-mb) that FILE
      does not list yet, at most --cap-mb per call, as one tar in parts of 15 MiB
      (`resume-<time>.tar.pNN`; a call brings back 8 files of 16 MiB), and adds them to FILE. A
      stage's entry travels with its last output file, so a partly carried stage is no hit.
  unpack DIR CACHE
      (device machine, before `dmdpipe run`) Joins and extracts every `resume-*.tar.p*` set in DIR
      into CACHE, oldest first.

Nothing here decides what is valid: `dmdpipe run` verifies every carried file against its entry.
"""
import argparse
import glob
import io
import json
import os
import re
import sys
import tarfile
import time


def candidates(cache, min_seconds, max_object_mb, cap_bytes):
    """(entry path, [object file paths]) of finished stages worth carrying, longest first (none
    with a file larger than one call can bring back)."""
    found = []
    for path in glob.glob(os.path.join(cache, 'entries', '*.json')):
        try:
            entry = json.load(open(path))
        except (OSError, ValueError):
            continue  # an entry being written: the next poll sees it whole
        size = sum(f.get('size', 0) for f in entry.get('files', []))
        if entry.get('duration_s', 0) < min_seconds or size > max_object_mb << 20:
            continue
        if any(f.get('size', 0) > cap_bytes for f in entry['files']):
            continue
        files = [os.path.join('objects', entry['tree'], f['path']) for f in entry['files']]
        found.append((entry.get('duration_s', 0), os.path.relpath(path, cache), files))
    found.sort(key=lambda c: -c[0])
    return [(e, files) for _, e, files in found]


def choose(cache, sent, cap_bytes, min_seconds, max_object_mb):
    """Unsent files (relative to CACHE) up to cap_bytes; each entry after all its files."""
    chosen, total = [], 0
    for entry, files in candidates(cache, min_seconds, max_object_mb, cap_bytes):
        for rel in files + [entry]:
            if rel in sent:
                continue
            size = os.path.getsize(os.path.join(cache, rel))
            if total + size > cap_bytes and chosen:
                return chosen
            chosen.append(rel)
            total += size
    return chosen


def pack(a):
    sent = set(open(a.sent).read().split('\n')) if os.path.exists(a.sent) else set()
    chosen = choose(a.cache, sent, int(a.cap_mb * (1 << 20)), a.min_seconds, a.max_object_mb)
    if not chosen:
        print('resume: nothing new to carry')
        return
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w') as tar:
        tag = os.path.join(a.cache, 'CACHEDIR.TAG')
        if os.path.exists(tag):  # dmdpipe takes a non-empty cache only with its tag
            tar.add(tag, 'CACHEDIR.TAG')
        for rel in chosen:
            tar.add(os.path.join(a.cache, rel), rel)
    data = buf.getvalue()
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f'resume-{time.strftime("%Y%m%dT%H%M%S")}.tar')
    part = int(a.part_mb * (1 << 20))
    for i in range(0, len(data), part):
        with open(f'{stem}.p{i // part:02d}', 'wb') as f:
            f.write(data[i:i + part])
    with open(a.sent, 'a') as f:
        f.write(''.join(rel + '\n' for rel in chosen))
    entries = [rel for rel in chosen if rel.startswith('entries')]
    print(f'resume: {len(chosen)} files, {len(data) >> 20} MiB, {len(entries)} whole stages -> {stem}.p*')


def unpack(a):
    stems = sorted({re.sub(r'\.p\d+$', '', p) for p in glob.glob(os.path.join(a.dir, 'resume-*.tar.p*'))})
    os.makedirs(a.cache, exist_ok=True)
    for stem in stems:
        parts = sorted(glob.glob(glob.escape(stem) + '.p*'))
        data = b''.join(open(p, 'rb').read() for p in parts)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            if hasattr(tarfile, 'data_filter'):
                tar.extractall(a.cache, filter='data')
            else:  # members are our own relative paths
                tar.extractall(a.cache)
        print(f'resume: {os.path.basename(stem)} ({len(parts)} parts) into {a.cache}')
    if not stems:
        print('resume: no resume-*.tar.p* in', a.dir)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('pack')
    p.add_argument('cache')
    p.add_argument('out')
    p.add_argument('--sent', required=True)
    p.add_argument('--cap-mb', type=float, default=56)
    p.add_argument('--min-seconds', type=float, default=30)
    p.add_argument('--max-object-mb', type=int, default=200)
    p.add_argument('--part-mb', type=float, default=15)
    p.set_defaults(run=pack)
    u = sub.add_parser('unpack')
    u.add_argument('dir')
    u.add_argument('cache')
    u.set_defaults(run=unpack)
    a = ap.parse_args(argv)
    a.run(a)


if __name__ == '__main__':
    sys.exit(main())
