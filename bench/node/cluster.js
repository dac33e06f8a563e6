'use strict';
// Node cluster hello world, the comparison baseline for bench/run.sh.
// Adapted from the team's research harness (shared/research/bench/node/server.js).
//   WORKERS=2 node cluster.js                                  -> cluster, SCHED_RR (Node's default on Linux)
//   WORKERS=2 NODE_CLUSTER_SCHED_POLICY=none node cluster.js   -> cluster, SCHED_NONE (shared fd)
//   WORKERS=0 node cluster.js                                  -> one process, no cluster
// PORT (default 8080), HOST (default 127.0.0.1). With UDP_PORT set, every
// worker also echoes datagrams on a UDP socket bound there (Node clusters UDP
// with a shared handle whatever the policy).
// Each serving process counts TCP connections and HTTP requests. On SIGTERM
// (the harness signals the whole process group) it writes "<conns> <reqs>" to
// $BENCH_STATS_DIR/<pid> when that is set.
const cluster = require('cluster');
const http = require('http');
const dgram = require('dgram');
const fs = require('fs');
const path = require('path');

const PORT = +(process.env.PORT || 8080);
const HOST = process.env.HOST || '127.0.0.1';
const UDP_PORT = process.env.UDP_PORT ? +process.env.UDP_PORT : 0;
const WORKERS = +(process.env.WORKERS ?? 2);
const STATS_DIR = process.env.BENCH_STATS_DIR;

function serve(role) {
  let conns = 0, reqs = 0;
  const body = 'Hello World\n';
  const server = http.createServer((req, res) => {
    reqs++;
    res.end(body);
  });
  server.on('connection', () => { conns++; });
  server.listen(PORT, HOST);
  if (UDP_PORT) {
    const udp = dgram.createSocket('udp4');
    udp.on('message', (msg, rinfo) => udp.send(msg, rinfo.port, rinfo.address));
    udp.bind(UDP_PORT, HOST);
  }
  let done = false;
  const report = () => {
    if (done) return;
    done = true;
    if (STATS_DIR) {
      try { fs.writeFileSync(path.join(STATS_DIR, String(process.pid)), `${conns} ${reqs}\n`); } catch (e) {}
    }
  };
  const quit = () => { report(); process.exit(0); };
  process.on('SIGTERM', quit);
  process.on('SIGINT', quit);
  // A cluster worker whose primary went away reports before exiting.
  process.on('disconnect', quit);
}

if (WORKERS > 0 && cluster.isPrimary) {
  const policy = cluster.schedulingPolicy === cluster.SCHED_RR ? 'rr' : 'none';
  process.stderr.write(`primary pid=${process.pid} policy=${policy} workers=${WORKERS}\n`);
  for (let i = 0; i < WORKERS; i++) cluster.fork();
  let alive = WORKERS;
  cluster.on('exit', () => { if (--alive === 0) process.exit(0); });
  // Workers get the group-wide SIGTERM themselves; wait for them, bounded.
  const stop = () => { setTimeout(() => process.exit(0), 3000).unref(); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  serve(WORKERS > 0 ? 'worker' : 'single');
}
