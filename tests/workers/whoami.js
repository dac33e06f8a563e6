// Node's own http server on the socket at fd 3, as a program written for socket activation
// does (tests/reuseport.rs). Every answer is `worker <SOCKVISOR_WORKER_ID> pid <pid>`.
//
// On SIGTERM it drains: it stops accepting, answers every request that reaches it with
// `Connection: close` (so each keep-alive connection ends after an answer), and exits once
// the last connection is gone. Not `server.close()`: in Node 19+ that also destroys the idle
// keep-alive connections, which resets a request already on its way to one of them (a
// failed request the client cannot safely retry).
'use strict';
const http = require('http');
const net = require('net');

const body = `worker ${process.env.SOCKVISOR_WORKER_ID || '?'} pid ${process.pid}\n`;
let draining = false;
const server = http.createServer((req, res) => {
  const headers = { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) };
  if (draining) headers.Connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
});
server.listen({ fd: 3 });
process.on('SIGTERM', () => {
  draining = true;
  net.Server.prototype.close.call(server, () => process.exit(0));
});
