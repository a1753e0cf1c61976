// The cases of the Gateway API mesh (GAMMA) conformance suite, transcribed
// by hand from kubernetes-sigs/gateway-api `conformance/tests/mesh/*.go`
// (the file of each test is named in `Case::file`). What a case checks is
// what `conformance/utils/echo/pod.go` (`compareRequest`) and
// `conformance/utils/http/http.go` (`CompareRequest`, redirects) check:
// status, the headers the backend saw (values joined with ","), headers it
// must not see, response headers present and absent, the backend (pod name
// prefix), the path the backend saw, and a redirect's scheme, host, port
// and path with the defaults of `setRedirectRequestDefaults`.
//
// This file is plain data and is `include!`d by the pure transcription in
// `node/proxy/src/filters.rs` and by `tests/tests/gamma_conformance.rs`.

/// The namespace of the upstream suite's services and most callers.
pub const MESH_NS: &str = "gateway-conformance-mesh";
/// The namespace of the consumer-route test's second caller.
pub const CONSUMER_NS: &str = "gateway-conformance-mesh-consumer";
/// The path a gRPC call uses (istio echo's service, as the upstream client).
pub const GRPC_PATH: &str = "/proto.EchoTestService/Echo";

/// A redirect's expected parts; `""` means "the default" as in
/// `setRedirectRequestDefaults`: any host, the request's scheme (`http`) and
/// path, and for the port 80/443 or none.
#[derive(Debug, Clone, Default)]
pub struct Redirect {
    pub scheme: &'static str,
    pub host: &'static str,
    pub port: &'static str,
    pub path: &'static str,
}

/// One upstream case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Upstream test (`ShortName`).
    pub test: &'static str,
    /// Upstream file under `conformance/tests/mesh/`.
    pub file: &'static str,
    /// Manifests applied for the test (in tests/conformance/gateway-api-mesh, copied unchanged from upstream with its LICENSE and SOURCE).
    pub manifests: &'static [&'static str],
    /// The caller's namespace.
    pub caller_ns: &'static str,
    /// The caller's own service (`echo-v1` or `echo-v2` pod).
    pub caller: &'static str,
    /// What the caller dials (`Request.Host`), e.g. `echo`, `echo-v1:8080`.
    pub dial: &'static str,
    /// A different Host header than the dialled address (`Headers["Host"]`).
    pub host_header: Option<&'static str>,
    /// Path and query.
    pub path: &'static str,
    pub headers: Vec<(&'static str, &'static str)>,
    pub grpc: bool,
    pub status: u16,
    /// Pod name prefix of the backend (`""`: any).
    pub backend: &'static str,
    /// The path the backend must see (only where the case states it).
    pub expect_path: Option<&'static str>,
    pub expect_headers: Vec<(&'static str, &'static str)>,
    pub absent_headers: Vec<&'static str>,
    pub response_headers: Vec<(&'static str, &'static str)>,
    pub response_absent: Vec<&'static str>,
    pub redirect: Option<Redirect>,
    /// A weight test: the share each backend must get (±5 points).
    pub weights: Vec<(&'static str, f64)>,
}

impl Case {
    fn new(test: &'static str, file: &'static str, manifests: &'static [&'static str]) -> Self {
        Case {
            test,
            file,
            manifests,
            caller_ns: MESH_NS,
            caller: "echo-v1",
            dial: "echo",
            host_header: None,
            path: "/",
            headers: Vec::new(),
            grpc: false,
            status: 200,
            backend: "",
            expect_path: None,
            expect_headers: Vec::new(),
            absent_headers: Vec::new(),
            response_headers: Vec::new(),
            response_absent: Vec::new(),
            redirect: None,
            weights: Vec::new(),
        }
    }
    fn dial(mut self, d: &'static str) -> Self {
        self.dial = d;
        self
    }
    fn path(mut self, p: &'static str) -> Self {
        self.path = p;
        self
    }
    fn to(mut self, backend: &'static str) -> Self {
        self.backend = backend;
        self
    }
    fn status(mut self, s: u16) -> Self {
        self.status = s;
        self
    }
    fn send(mut self, h: &[(&'static str, &'static str)]) -> Self {
        self.headers = h.to_vec();
        self
    }
    fn sees(mut self, h: &[(&'static str, &'static str)]) -> Self {
        self.expect_headers = h.to_vec();
        self
    }
    fn sees_path(mut self, p: &'static str) -> Self {
        self.expect_path = Some(p);
        self
    }
    fn lacks(mut self, h: &[&'static str]) -> Self {
        self.absent_headers = h.to_vec();
        self
    }
    fn answers(mut self, h: &[(&'static str, &'static str)]) -> Self {
        self.response_headers = h.to_vec();
        self
    }
    fn answers_without(mut self, h: &[&'static str]) -> Self {
        self.response_absent = h.to_vec();
        self
    }
    fn redirect(mut self, status: u16, r: Redirect) -> Self {
        self.status = status;
        self.redirect = Some(r);
        self
    }
    fn from(mut self, ns: &'static str, caller: &'static str) -> Self {
        self.caller_ns = ns;
        self.caller = caller;
        self
    }
    fn grpc(mut self) -> Self {
        self.grpc = true;
        self.dial = "echo:7070";
        self.path = GRPC_PATH;
        self
    }
}

fn r(scheme: &'static str, host: &'static str, port: &'static str, path: &'static str) -> Redirect {
    Redirect {
        scheme,
        host,
        port,
        path,
    }
}

/// Every case of the 23 upstream mesh tests (85 cases).
pub fn all() -> Vec<Case> {
    let mut c = Vec::new();

    // mesh-basic.go: reachability with no routes.
    c.push(Case::new("MeshBasic", "mesh-basic.go", &[]));

    // httproute-303-redirect.go, -307-, -308-: Host defaults to "echo".
    let m = &["httproute-303-redirect.yaml"];
    c.push(
        Case::new("MeshHTTPRoute303Redirect", "httproute-303-redirect.go", m)
            .path("/redirect")
            .redirect(303, r("", "", "", "/redirect")),
    );
    let m = &["httproute-307-redirect.yaml"];
    c.push(
        Case::new("MeshHTTPRoute307Redirect", "httproute-307-redirect.go", m)
            .path("/temporary")
            .redirect(307, r("", "", "", "/temporary")),
    );
    let m = &["httproute-308-redirect.yaml"];
    c.push(
        Case::new("MeshHTTPRoute308Redirect", "httproute-308-redirect.go", m)
            .path("/permanent")
            .redirect(308, r("", "", "", "/permanent")),
    );

    // httproute-redirect-host-and-status.go
    let (t, f, m) = (
        "MeshHTTPRouteRedirectHostAndStatus",
        "httproute-redirect-host-and-status.go",
        &["httproute-redirect-host-and-status.yaml"],
    );
    c.push(
        Case::new(t, f, m)
            .path("/hostname-redirect")
            .redirect(302, r("", "example.org", "", "")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/host-and-status")
            .redirect(301, r("", "example.org", "", "")),
    );

    // httproute-redirect-path.go
    let (t, f, m) = (
        "MeshHTTPRouteRedirectPath",
        "httproute-redirect-path.go",
        &["httproute-redirect-path.yaml"],
    );
    c.push(
        Case::new(t, f, m)
            .path("/original-prefix/lemon")
            .redirect(302, r("", "", "", "/replacement-prefix/lemon")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/full/path/original")
            .redirect(302, r("", "", "", "/full-path-replacement")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/path-and-host")
            .redirect(302, r("", "example.org", "", "/replacement-prefix")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/path-and-status")
            .redirect(301, r("", "", "", "/replacement-prefix")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/full-path-and-host")
            .redirect(302, r("", "example.org", "", "/replacement-full")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/full-path-and-status")
            .redirect(301, r("", "", "", "/replacement-full")),
    );

    // httproute-redirect-port.go
    let (t, f, m) = (
        "MeshHTTPRouteRedirectPort",
        "httproute-redirect-port.go",
        &["httproute-redirect-port.yaml"],
    );
    c.push(
        Case::new(t, f, m)
            .path("/port")
            .redirect(302, r("", "", "8083", "")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/port-and-host")
            .redirect(302, r("", "example.org", "8083", "")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/port-and-status")
            .redirect(301, r("", "", "8083", "")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/port-and-host-and-status")
            .redirect(302, r("", "example.org", "8083", "")),
    );

    // httproute-redirect-scheme.go
    let (t, f, m) = (
        "MeshHTTPRouteSchemeRedirect",
        "httproute-redirect-scheme.go",
        &["httproute-redirect-scheme.yaml"],
    );
    c.push(
        Case::new(t, f, m)
            .path("/scheme")
            .redirect(302, r("https", "", "", "")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/scheme-and-host")
            .redirect(302, r("https", "example.org", "", "")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/scheme-and-status")
            .redirect(301, r("https", "", "", "")),
    );
    c.push(
        Case::new(t, f, m)
            .path("/scheme-and-host-and-status")
            .redirect(302, r("https", "example.org", "", "")),
    );

    // httproute-matching.go
    let (t, f, m) = (
        "MeshHTTPRouteMatching",
        "httproute-matching.go",
        &["httproute-matching.yaml"],
    );
    c.push(Case::new(t, f, m).path("/").to("echo-v1"));
    c.push(Case::new(t, f, m).path("/example").to("echo-v1"));
    c.push(
        Case::new(t, f, m)
            .path("/")
            .send(&[("Version", "one")])
            .to("echo-v1"),
    );
    c.push(Case::new(t, f, m).path("/v2").to("echo-v2"));
    c.push(Case::new(t, f, m).path("/v2/example").to("echo-v2"));
    c.push(
        Case::new(t, f, m)
            .path("/")
            .send(&[("Version", "two")])
            .to("echo-v2"),
    );
    c.push(Case::new(t, f, m).path("/v2/").to("echo-v2"));
    c.push(Case::new(t, f, m).path("/v2example").to("echo-v1"));
    c.push(Case::new(t, f, m).path("/foo/v2/example").to("echo-v1"));

    // httproute-named-rule.go. Upstream's second case lists the expected
    // path "/named" for a request to "/unnamed"; its mesh comparator never
    // checks paths, so the path is left unchecked there.
    let (t, f, m) = (
        "MeshHTTPRouteNamedRule",
        "httproute-named-rule.go",
        &["httproute-named-rule.yaml"],
    );
    c.push(
        Case::new(t, f, m)
            .path("/named")
            .sees_path("/named")
            .to("echo-v1"),
    );
    c.push(Case::new(t, f, m).path("/unnamed").to("echo-v2"));

    // httproute-query-param-matching.go
    let (t, f, m) = (
        "MeshHTTPRouteQueryParamMatching",
        "httproute-query-param-matching.go",
        &["httproute-query-param-matching.yaml"],
    );
    c.push(Case::new(t, f, m).path("/?animal=whale").to("echo-v1"));
    c.push(Case::new(t, f, m).path("/?animal=dolphin").to("echo-v2"));
    c.push(
        Case::new(t, f, m)
            .path("/?animal=whale&otherparam=irrelevant")
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .path("/?animal=dolphin&color=yellow")
            .to("echo-v2"),
    );
    c.push(Case::new(t, f, m).path("/?color=blue").status(404));
    c.push(Case::new(t, f, m).path("/?animal=dog").status(404));
    c.push(Case::new(t, f, m).path("/?animal=whaledolphin").status(404));
    c.push(Case::new(t, f, m).path("/").status(404));
    c.push(Case::new(t, f, m).path("/path1?animal=whale").to("echo-v1"));
    c.push(
        Case::new(t, f, m)
            .path("/?animal=whale")
            .send(&[("version", "one")])
            .to("echo-v2"),
    );
    c.push(Case::new(t, f, m).path("/path3?animal=shark").to("echo-v1"));
    c.push(
        Case::new(t, f, m)
            .path("/path4?animal=kraken")
            .send(&[("version", "three")])
            .to("echo-v1"),
    );
    c.push(Case::new(t, f, m).path("/?animal=shark").status(404));
    c.push(Case::new(t, f, m).path("/path4?animal=kraken").status(404));
    c.push(Case::new(t, f, m).path("/path5?animal=hydra").to("echo-v1"));

    // httproute-request-header-modifier.go: the same cases for the rule
    // filters and for backendRefs[].filters.
    for (t, m) in [
        (
            "MeshHTTPRouteRequestHeaderModifier",
            &["httproute-request-header-modifier.yaml"],
        ),
        (
            "MeshHTTPRouteBackendRequestHeaderModifier",
            &["httproute-request-header-modifier-backend.yaml"],
        ),
    ] {
        let f = "httproute-request-header-modifier.go";
        c.push(
            Case::new(t, f, m)
                .path("/set")
                .send(&[("Some-Other-Header", "val")])
                .sees_path("/set")
                .sees(&[
                    ("Some-Other-Header", "val"),
                    ("X-Header-Set", "set-overwrites-values"),
                ])
                .to("echo-v1"),
        );
        c.push(
            Case::new(t, f, m)
                .path("/set")
                .send(&[
                    ("Some-Other-Header", "val"),
                    ("X-Header-Set", "some-other-value"),
                ])
                .sees_path("/set")
                .sees(&[
                    ("Some-Other-Header", "val"),
                    ("X-Header-Set", "set-overwrites-values"),
                ])
                .to("echo-v1"),
        );
        c.push(
            Case::new(t, f, m)
                .path("/add")
                .send(&[("Some-Other-Header", "val")])
                .sees_path("/add")
                .sees(&[
                    ("Some-Other-Header", "val"),
                    ("X-Header-Add", "add-appends-values"),
                ])
                .to("echo-v1"),
        );
        c.push(
            Case::new(t, f, m)
                .path("/add")
                .send(&[
                    ("Some-Other-Header", "val"),
                    ("X-Header-Add", "some-other-value"),
                ])
                .sees_path("/add")
                .sees(&[
                    ("Some-Other-Header", "val"),
                    ("X-Header-Add", "some-other-value,add-appends-values"),
                ])
                .to("echo-v1"),
        );
        c.push(
            Case::new(t, f, m)
                .path("/remove")
                .send(&[("X-Header-Remove", "val")])
                .sees_path("/remove")
                .lacks(&["X-Header-Remove"])
                .to("echo-v1"),
        );
        c.push(
            Case::new(t, f, m)
                .path("/multiple")
                .send(&[
                    ("X-Header-Set-2", "set-val-2"),
                    ("X-Header-Add-2", "add-val-2"),
                    ("X-Header-Remove-2", "remove-val-2"),
                    ("Another-Header", "another-header-val"),
                ])
                .sees_path("/multiple")
                .sees(&[
                    ("X-Header-Set-1", "header-set-1"),
                    ("X-Header-Set-2", "header-set-2"),
                    ("X-Header-Add-1", "header-add-1"),
                    ("X-Header-Add-2", "add-val-2,header-add-2"),
                    ("X-Header-Add-3", "header-add-3"),
                    ("Another-Header", "another-header-val"),
                ])
                .lacks(&["X-Header-Remove-1", "X-Header-Remove-2"])
                .to("echo-v1"),
        );
        c.push(
            Case::new(t, f, m)
                .path("/case-insensitivity")
                .send(&[
                    ("x-header-set", "original-val-set"),
                    ("x-header-add", "original-val-add"),
                    ("x-header-remove", "original-val-remove"),
                    ("Another-Header", "another-header-val"),
                ])
                .sees_path("/case-insensitivity")
                .sees(&[
                    ("X-Header-Set", "header-set"),
                    ("X-Header-Add", "original-val-add,header-add"),
                    ("Another-Header", "another-header-val"),
                ])
                .lacks(&["x-header-remove", "X-Header-Remove"])
                .to("echo-v1"),
        );
    }

    // httproute-rewrite-path.go
    let (t, f, m) = (
        "MeshHTTPRouteRewritePath",
        "httproute-rewrite-path.go",
        &["httproute-rewrite-path.yaml"],
    );
    c.push(
        Case::new(t, f, m)
            .path("/prefix/one/two")
            .sees_path("/one/two")
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .path("/strip-prefix/three")
            .sees_path("/three")
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .path("/strip-prefix")
            .sees_path("/")
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .path("/full/one/two")
            .sees_path("/one")
            .to("echo-v1"),
    );
    for (path, want) in [
        ("/full/rewrite-path-and-modify-headers/test", "/test"),
        ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
    ] {
        c.push(
            Case::new(t, f, m)
                .path(path)
                .send(&[
                    ("X-Header-Remove", "remove-val"),
                    ("X-Header-Add-Append", "append-val-1"),
                    ("X-Header-Set", "set-val"),
                ])
                .sees_path(want)
                .sees(&[
                    ("X-Header-Add", "header-val-1"),
                    ("X-Header-Add-Append", "append-val-1,header-val-2"),
                    ("X-Header-Set", "set-overwrites-values"),
                ])
                .lacks(&["X-Header-Remove"])
                .to("echo-v1"),
        );
    }

    // httproute-simple-same-namespace.go
    c.push(
        Case::new(
            "MeshHTTPRouteSimpleSameNamespace",
            "httproute-simple-same-namespace.go",
            &["httproute-simple-same-namespace.yaml"],
        )
        .to("echo-v1"),
    );

    // httproute-weight.go: 70/30 over 500 requests, ±5 points.
    let mut w = Case::new(
        "MeshHTTPRouteWeight",
        "httproute-weight.go",
        &["httproute-weight.yaml"],
    );
    w.weights = vec![("echo-v1", 0.7), ("echo-v2", 0.3)];
    c.push(w);

    // mesh-consumer-route.go
    let (t, f, m) = (
        "MeshConsumerRoute",
        "mesh-consumer-route.go",
        &["mesh-consumer-route.yaml"],
    );
    c.push(
        Case::new(t, f, m)
            .from(CONSUMER_NS, "echo-v1")
            .dial("echo-v1.gateway-conformance-mesh")
            .answers(&[("X-Header-Set", "set")])
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .from(MESH_NS, "echo-v1")
            .dial("echo-v1.gateway-conformance-mesh")
            .answers_without(&["X-Header-Set"])
            .to("echo-v1"),
    );

    // mesh-frontend.go. The second case dials echo-v2's pod address (not a
    // service) on 8080; `dial` "pod:echo-v2:8080" stands for it.
    let (t, f, m) = ("MeshFrontend", "mesh-frontend.go", &["mesh-frontend.yaml"]);
    c.push(
        Case::new(t, f, m)
            .dial("echo-v2")
            .answers(&[("X-Header-Set", "set")])
            .to("echo-v2"),
    );
    c.push(
        Case::new(t, f, m)
            .dial("pod:echo-v2:8080")
            .answers_without(&["X-Header-Set"])
            .to("echo-v2"),
    );

    // mesh-frontend-hostname.go: routes follow the dialled service, not Host.
    let (t, f, m) = (
        "MeshFrontendHostname",
        "mesh-frontend-hostname.go",
        &["mesh-frontend.yaml"],
    );
    let mut a = Case::new(t, f, m)
        .dial("echo-v2")
        .answers(&[("X-Header-Set", "set")])
        .to("echo-v2");
    a.host_header = Some("echo-v1");
    c.push(a);
    let mut b = Case::new(t, f, m)
        .dial("echo-v1")
        .answers_without(&["X-Header-Set"])
        .to("echo-v1");
    b.host_header = Some("echo-v2");
    c.push(b);

    // mesh-ports.go
    let (t, f, m) = ("MeshPorts", "mesh-ports.go", &["mesh-ports.yaml"]);
    c.push(
        Case::new(t, f, m)
            .dial("echo-v1")
            .answers(&[("X-Header-Set", "v1")])
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .dial("echo-v1:8080")
            .answers_without(&["X-Header-Set"])
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .dial("echo-v2")
            .answers(&[("X-Header-Set", "v2")])
            .to("echo-v2"),
    );
    c.push(
        Case::new(t, f, m)
            .dial("echo-v2:8080")
            .answers(&[("X-Header-Set", "v2")])
            .to("echo-v2"),
    );

    // mesh-split.go
    let (t, f, m) = ("MeshTrafficSplit", "mesh-split.go", &["mesh-split.yaml"]);
    c.push(Case::new(t, f, m).path("/v1").to("echo-v1"));
    c.push(Case::new(t, f, m).path("/v2").to("echo-v2"));

    // grpcroute-request-header-modifier.go
    let (t, f, m) = (
        "MeshGRPCRouteRequestHeaderModifier",
        "grpcroute-request-header-modifier.go",
        &["grpcroute-request-header-modifier.yaml"],
    );
    c.push(
        Case::new(t, f, m)
            .grpc()
            .send(&[
                ("x-test-case", "set"),
                ("some-other-header", "this-header-should-be-set"),
                ("x-header-set", "this-value-should-be-overwritten"),
            ])
            .sees(&[
                ("x-test-case", "set"),
                ("some-other-header", "this-header-should-be-set"),
                ("x-header-set", "set-overwrites-values"),
            ])
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .grpc()
            .send(&[
                ("x-test-case", "add"),
                ("x-header-add", "this-value-should-be-appended"),
            ])
            .sees(&[
                ("x-test-case", "add"),
                (
                    "x-header-add",
                    "this-value-should-be-appended,add-appends-values",
                ),
            ])
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .grpc()
            .send(&[
                ("x-test-case", "remove"),
                ("x-header-remove", "this-should-be-removed"),
            ])
            .sees(&[("x-test-case", "remove")])
            .lacks(&["x-header-remove"])
            .to("echo-v1"),
    );
    c.push(
        Case::new(t, f, m)
            .grpc()
            .from(MESH_NS, "echo-v2")
            .send(&[
                ("x-test-case", "multi"),
                ("x-header-set-2", "set-header-2"),
                ("x-header-add-2", "add-header-2"),
                ("x-header-remove-2", "should-be-removed-2"),
            ])
            .sees(&[
                ("x-test-case", "multi"),
                ("x-header-set-1", "header-set-1"),
                ("x-header-set-2", "header-set-2"),
                ("x-header-add-1", "header-add-1"),
                ("x-header-add-2", "add-header-2,header-add-2"),
            ])
            .lacks(&["x-header-remove-1", "x-header-remove-2"])
            .to("echo-v2"),
    );

    // grpcroute-weight.go: 70/30/0.
    let mut g = Case::new(
        "MeshGRPCRouteWeight",
        "grpcroute-weight.go",
        &["grpcroute-weight.yaml"],
    )
    .grpc();
    g.weights = vec![("echo-v1", 0.7), ("echo-v2", 0.3)];
    c.push(g);

    c
}
