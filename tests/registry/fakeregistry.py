"""An in-memory OCI registry as an `httpx.MockTransport` handler, with faults as data.

Serves several hosts by name: the registry itself, its mirrors, a token realm
(`auth.test`) and blob storage (`storage.test`) for redirects. Faults are scripted per
request path: `fake.script(path, ["ok", 503, 503, "ok"])`; each request to that path
takes the next item. Items: "ok", an int status, (status, {headers}), "connect",
"tls" (a plain-HTTP server met over HTTPS), "timeout", "ignore-range".
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import trio

TOKEN_HOST = "auth.test"
STORAGE_HOST = "storage.test"


@dataclass
class Seen:
    method: str
    url: httpx.URL
    headers: httpx.Headers
    body: bytes


@dataclass
class FakeRegistry:
    host: str = "registry.test"
    blobs: dict[str, bytes] = field(default_factory=dict)
    # (repository, digest) pairs a blob is visible in; "*" for every repository
    links: set[tuple[str, str]] = field(default_factory=set)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    # auth: None, "basic" or "bearer"; users: username -> password
    auth: str | None = None
    users: dict[str, str] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    token_lifetime: int = 300
    redirect_blobs: bool = False
    referrers_api: bool = False  # serve GET /v2/<repo>/referrers/<digest> (OCI 1.1)
    # a Range of several ranges: "multipart" (multipart/byteranges, as Go's file server),
    # "first" (a 206 of the first range only) or "ignore" (200, the whole blob)
    multi_range: str = "multipart"
    # "host:port" -> the one scheme its server speaks: HTTPS to a plain server fails the
    # handshake, plain HTTP to a TLS server gets Go's 400
    speaks: dict[str, str] = field(default_factory=dict)
    storage_expired: bool = False
    seen: list[Seen] = field(default_factory=list)
    _scripts: dict[str, list[object]] = field(default_factory=lambda: defaultdict(list))
    _uploads: dict[str, bytearray] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)

    # -- test setup ------------------------------------------------------------------

    def add_blob(self, data: bytes, repo: str = "*") -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        self.links.add((repo, digest))
        return digest

    def has_blob(self, repo: str, digest: str) -> bool:
        return digest in self.blobs and bool({(repo, digest), ("*", digest)} & self.links)

    def add_manifest(self, repo: str, tag: str | None, doc: dict, media_type: str) -> str:
        raw = json.dumps(doc).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.manifests[(repo, digest)] = (raw, media_type)
        if tag:
            self.manifests[(repo, tag)] = (raw, media_type)
        return digest

    def script(self, path: str, items: list[object]) -> None:
        self._scripts[path].extend(items)

    def transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            await trio.lowlevel.checkpoint()  # let concurrent requests interleave
            return self.handle(request)

        return httpx.MockTransport(handle)

    def requests_to(self, host: str, method: str | None = None) -> list[Seen]:
        return [
            s
            for s in self.seen
            if s.url.host == host.partition(":")[0] and (method is None or s.method == method)
        ]

    # -- the handler -----------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.seen.append(Seen(request.method, request.url, httpx.Headers(request.headers), body))
        speaks = self.speaks.get(f"{request.url.host}:{request.url.port}")
        if speaks == "http" and request.url.scheme == "https":
            try:
                raise ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
            except ssl.SSLError:
                raise httpx.ConnectError("", request=request) from None
        if speaks == "https" and request.url.scheme == "http":
            return httpx.Response(400, text="Client sent an HTTP request to an HTTPS server.\n")
        script = self._scripts.get(request.url.path)
        step = script.pop(0) if script else "ok"
        if step == "connect":
            raise httpx.ConnectError("all attempts to connect failed", request=request)
        if step == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if step == "tls":
            try:
                raise ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
            except ssl.SSLError:
                raise httpx.ConnectError("", request=request) from None
        if isinstance(step, int):
            return httpx.Response(step, json={"errors": [{"code": "SCRIPTED"}]})
        if isinstance(step, tuple):
            return httpx.Response(step[0], headers=step[1])
        host = request.url.host
        if host == TOKEN_HOST:
            return self._token(request, body)
        if host == STORAGE_HOST:
            return self._storage(request, ignore_range=step == "ignore-range")
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        return self._api(request, body, ignore_range=step == "ignore-range")

    def _check_auth(self, request: httpx.Request) -> httpx.Response | None:
        header = request.headers.get("authorization", "")
        if self.auth == "basic":
            if header.startswith("Basic "):
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                if self.users.get(user) == pw:
                    return None
            return httpx.Response(
                401, headers={"WWW-Authenticate": 'Basic realm="fake"'}, json={"errors": []}
            )
        if self.auth == "bearer":
            m = re.match(r"^/v2/(.+)/(manifests|blobs)/", request.url.path)
            repo = m.group(1) if m else ""
            action = "pull" if request.method in ("GET", "HEAD") else "push"
            if header.startswith("Bearer ") and _grants(self._tokens.get(header[7:]), repo, action):
                return None
            scope = f"repository:{repo}:pull" if m else ""
            if action == "push" and m:
                scope += ",push"
            challenge = f'Bearer realm="https://{TOKEN_HOST}/token",service="fake"'
            if scope:
                challenge += f',scope="{scope}"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return None

    def _token(self, request: httpx.Request, body: bytes) -> httpx.Response:
        scopes = request.url.params.get_list("scope")
        if request.method == "POST":
            scopes = httpx.QueryParams(body.decode()).get_list("scope")
            form = dict(httpx.QueryParams(body.decode()))
            if form.get("grant_type") != "refresh_token":
                return httpx.Response(400)
            if form.get("refresh_token") not in self.refresh_tokens:
                return httpx.Response(401)
        else:
            header = request.headers.get("authorization", "")
            if header.startswith("Basic "):
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                if self.users.get(user) != pw:
                    return httpx.Response(401)
            elif self.users:
                return httpx.Response(401)
        token = uuid.uuid4().hex
        self._tokens[token] = " ".join(scopes)
        return httpx.Response(200, json={"token": token, "expires_in": self.token_lifetime})

    def _api(self, request: httpx.Request, body: bytes, ignore_range: bool) -> httpx.Response:
        path = request.url.path
        if path in ("/v2", "/v2/"):
            return httpx.Response(200, json={})
        m = re.match(r"^/v2/(.+)/manifests/([^/]+)$", path)
        if m:
            return self._manifest(request, m.group(1), m.group(2), body)
        m = re.match(r"^/v2/(.+)/referrers/([^/]+)$", path)
        if m and self.referrers_api:
            return self._referrers(m.group(1), m.group(2))
        m = re.match(r"^/v2/(.+)/blobs/uploads/([^/]*)$", path)
        if m:
            return self._upload(request, m.group(1), m.group(2), body)
        m = re.match(r"^/v2/(.+)/blobs/([^/]+)$", path)
        if m:
            digest = m.group(2)
            if not self.has_blob(m.group(1), digest):
                return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
            if self.redirect_blobs:
                where = f"https://{STORAGE_HOST}/store/{digest}?X-Sig=secret-signature"
                return httpx.Response(307, headers={"Location": where})
            return _serve(request, self.blobs[digest], ignore_range, self.multi_range)
        return httpx.Response(404)

    def _storage(self, request: httpx.Request, ignore_range: bool) -> httpx.Response:
        if self.storage_expired:
            return httpx.Response(403, text="<Error>Request has expired</Error>")
        digest = request.url.path.rpartition("/")[2]
        if digest not in self.blobs:
            return httpx.Response(404)
        return _serve(request, self.blobs[digest], ignore_range, self.multi_range)

    def _manifest(self, request: httpx.Request, repo: str, ref: str, body: bytes):
        if request.method == "PUT":
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            media_type = request.headers.get("content-type", "")
            self.manifests[(repo, digest)] = (body, media_type)
            self.manifests[(repo, ref)] = (body, media_type)
            return httpx.Response(201, headers={"Docker-Content-Digest": digest})
        found = self.manifests.get((repo, ref))
        if found is None:
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        raw, media_type = found
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
        return httpx.Response(
            200, headers=headers, content=b"" if request.method == "HEAD" else raw
        )

    def _referrers(self, repo: str, subject: str) -> httpx.Response:
        found = []
        for (r, key), (raw, media_type) in self.manifests.items():
            if r != repo or not key.startswith("sha256:"):
                continue
            doc = json.loads(raw)
            if (doc.get("subject") or {}).get("digest") != subject:
                continue
            entry = {"mediaType": media_type, "digest": key, "size": len(raw)}
            if doc.get("artifactType"):
                entry["artifactType"] = doc["artifactType"]
            if doc.get("annotations"):
                entry["annotations"] = doc["annotations"]
            found.append(entry)
        # A registry lists referrers in no promised order (distribution: by digest).
        found.sort(key=lambda e: e["digest"])
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": found}
        return httpx.Response(200, json=index,
                              headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})

    def _upload(self, request: httpx.Request, repo: str, session: str, body: bytes):
        base = f"/v2/{repo}/blobs/uploads/"
        if request.method == "POST":
            mount = request.url.params.get("mount")
            if mount and self.has_blob(request.url.params.get("from", ""), mount):
                self.links.add((repo, mount))
                return httpx.Response(201, headers={"Location": f"/v2/{repo}/blobs/{mount}"})
            session = uuid.uuid4().hex
            self._uploads[session] = bytearray()
            return httpx.Response(202, headers={"Location": f"{base}{session}?_state=x"})
        if session not in self._uploads:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UPLOAD_UNKNOWN"}]})
        if request.method == "PATCH":
            self._uploads[session] += body
            n = len(self._uploads[session])
            headers = {"Location": f"{base}{session}?_state=y", "Range": f"0-{n - 1}"}
            return httpx.Response(202, headers=headers)
        if request.method == "PUT":
            data = bytes(self._uploads.pop(session) + body)
            digest = request.url.params.get("digest", "")
            if digest != "sha256:" + hashlib.sha256(data).hexdigest():
                return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID"}]})
            self.blobs[digest] = data
            self.links.add((repo, digest))
            return httpx.Response(201, headers={"Docker-Content-Digest": digest})
        return httpx.Response(405)


def _grants(scopes: str | None, repo: str, action: str) -> bool:
    if scopes is None:
        return False
    if not repo:
        return True
    for scope in scopes.split(" "):
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind == "repository" and name == repo and action in actions.split(","):
            return True
    return False


def _serve(
    request: httpx.Request, data: bytes, ignore_range: bool, multi_range: str = "multipart"
) -> httpx.Response:
    if request.method == "HEAD":
        return httpx.Response(200, headers={"Content-Length": str(len(data))})
    header = request.headers.get("range", "")
    if ignore_range:
        return httpx.Response(200, content=data)
    if re.match(r"^bytes=\d+-\d+(,\d+-\d+)+$", header) and multi_range != "ignore":
        spans = [tuple(map(int, r.split("-"))) for r in header[6:].split(",")]
        if multi_range == "first":
            header = f"bytes={spans[0][0]}-{spans[0][1]}"
        else:
            body = b""
            for first, last in spans:
                body += (b"--FAKEBOUNDARY\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Range: bytes %d-%d/%d\r\n\r\n" % (first, last, len(data))
                         + data[first : last + 1] + b"\r\n")  # fmt: skip
            body += b"--FAKEBOUNDARY--\r\n"
            ctype = "multipart/byteranges; boundary=FAKEBOUNDARY"
            return httpx.Response(206, headers={"Content-Type": ctype}, content=body)
    if m := re.match(r"^bytes=(\d+)-(\d+)$", header):
        start, last = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
    elif m := re.match(r"^bytes=-(\d+)$", header):  # the last n bytes (RFC 9110 14.1.1)
        start, last = max(0, len(data) - int(m.group(1))), len(data) - 1
        if int(m.group(1)) == 0:
            return httpx.Response(416)
    else:
        return httpx.Response(200, content=data)
    if start >= len(data):
        return httpx.Response(416)
    headers = {"Content-Range": f"bytes {start}-{last}/{len(data)}"}
    return httpx.Response(206, headers=headers, content=data[start : last + 1])
