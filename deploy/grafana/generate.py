import json
R = "$__rate_interval"
SEL = 'instance=~"$instance"'
panels = []
y = 0
pid = 1
def row(title):
    global y, pid
    panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    pid += 1; y += 1
def ts(title, targets, unit="short", w=12, h=8, x=0, desc="", stack=False, maxv=None):
    global pid
    p = {"type": "timeseries", "title": title, "id": pid, "description": desc,
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "gridPos": {"h": h, "w": w, "x": x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10,
                         "stacking": {"mode": "normal" if stack else "none"}}}, "overrides": []},
         "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                     "tooltip": {"mode": "multi"}},
         "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l,
                      "datasource": {"type": "prometheus", "uid": "${datasource}"}} for i, (e, l) in enumerate(targets)]}
    if maxv is not None:
        p["fieldConfig"]["defaults"]["max"] = maxv
        p["fieldConfig"]["defaults"]["min"] = 0
    pid += 1
    panels.append(p)
def stat(title, expr, unit="short", w=6, x=0, desc="", thresholds=None):
    global pid
    p = {"type": "stat", "title": title, "id": pid, "description": desc,
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "gridPos": {"h": 4, "w": w, "x": x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit, "thresholds": thresholds or
                         {"mode": "absolute", "steps": [{"color": "green", "value": None}]}}, "overrides": []},
         "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                     "colorMode": "value", "graphMode": "area", "textMode": "auto"},
         "targets": [{"refId": "A", "expr": expr, "datasource": {"type": "prometheus", "uid": "${datasource}"}}]}
    pid += 1
    panels.append(p)

red_below = lambda v: {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": v}]}
red_above = lambda v: {"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": v}]}

row("Mesh")
stat("Nodes alive (max seen by any node)", f'max(shoal_members{{state="alive",{SEL}}})', x=0)
stat("Nodes dead", f'max(shoal_members{{state="dead",{SEL}}})', x=6, thresholds=red_above(1))
stat("Gossip healthy (nodes)", f'sum(shoal_gossip_healthy{{{SEL}}})', x=12,
     desc="Nodes whose gossip loop runs; a node whose gossip stopped turns /healthz 503 and exits 70.")
stat("Mesh success rate (outbound)",
     f'sum(rate(shoal_proxy_responses_total{{direction="outbound",classification="success",{SEL}}}[{R}])) / sum(rate(shoal_proxy_responses_total{{direction="outbound",{SEL}}}[{R}]))',
     unit="percentunit", x=18, thresholds=red_below(0.99))
y += 4
ts("Members by state, per node", [(f'shoal_members{{{SEL}}}', "{{instance}} {{state}}")], x=0)
ts("Peer round-trip time (QUIC)", [(f'shoal_peer_rtt_seconds{{{SEL}}}', "{{instance}} → {{peer}}")], unit="s", x=12)
y += 8

row("Traffic (golden metrics per edge)")
ts("Requests per second by service",
   [(f'sum by (destination, direction) (rate(shoal_proxy_requests_total{{{SEL}}}[{R}]))', "{{direction}} {{destination}}")],
   unit="reqps", x=0)
ts("Success rate by service (outbound)",
   [(f'sum by (destination) (rate(shoal_proxy_responses_total{{direction="outbound",classification="success",{SEL}}}[{R}])) / sum by (destination) (rate(shoal_proxy_responses_total{{direction="outbound",{SEL}}}[{R}]))', "{{destination}}")],
   unit="percentunit", x=12, maxv=1)
y += 8
ts("Latency p50 / p99 by service (outbound)",
   [(f'histogram_quantile(0.5, sum by (le, destination) (rate(shoal_proxy_request_duration_seconds_bucket{{direction="outbound",{SEL}}}[{R}])))', "p50 {{destination}}"),
    (f'histogram_quantile(0.99, sum by (le, destination) (rate(shoal_proxy_request_duration_seconds_bucket{{direction="outbound",{SEL}}}[{R}])))', "p99 {{destination}}")],
   unit="s", x=0)
ts("Responses by status and classification",
   [(f'sum by (destination, status_code, classification) (rate(shoal_proxy_responses_total{{{SEL}}}[{R}]))', "{{destination}} {{status_code}} {{classification}}")],
   unit="reqps", x=12, stack=True)
y += 8
ts("Requests in flight", [(f'sum by (destination, direction) (shoal_proxy_in_flight{{{SEL}}})', "{{direction}} {{destination}}")], x=0)
ts("Retries and refused peers",
   [(f'sum by (service) (rate(shoal_proxy_retries_total{{{SEL}}}[{R}]))', "retries {{service}}"),
    (f'sum by (instance) (rate(shoal_peer_not_serving_total{{{SEL}}}[{R}]))', "peer-not-serving {{instance}}")],
   unit="reqps", x=12)
y += 8
ts("Listener connections", [(f'shoal_listener_connections{{{SEL}}}', "{{instance}} {{listener}}")], x=0)
ts("Listener refusals and closes",
   [(f'sum by (listener) (rate(shoal_listener_refused_total{{{SEL}}}[{R}]))', "refused {{listener}}"),
    (f'sum by (listener, reason) (rate(shoal_listener_closed_total{{{SEL}}}[{R}]))', "closed {{listener}} {{reason}}"),
    (f'sum by (listener) (rate(shoal_listener_accept_errors_total{{{SEL}}}[{R}]))', "accept errors {{listener}}")],
   unit="ops", x=12)
y += 8

row("Transport (QUIC, mTLS)")
ts("QUIC connections", [(f'shoal_quic_connections{{{SEL}}}', "{{instance}}"),
                        (f'rate(shoal_quic_connections_opened_total{{{SEL}}}[{R}])', "opened/s {{instance}}"),
                        (f'rate(shoal_quic_connections_superseded_total{{{SEL}}}[{R}])', "superseded/s {{instance}}")], x=0)
ts("Handshake refusals and failures",
   [(f'sum by (reason) (rate(shoal_quic_handshake_refusals_total{{{SEL}}}[{R}]))', "refused: {{reason}}"),
    (f'sum(rate(shoal_quic_handshake_failures_total{{{SEL}}}[{R}]))', "failed")],
   unit="ops", x=12, desc="A certificate from another CA or trust domain, expired, or naming no node.")
y += 8
ts("Messages refused, bytes buffered",
   [(f'sum by (reason) (rate(shoal_quic_messages_refused_total{{{SEL}}}[{R}]))', "refused: {{reason}}"),
    (f'shoal_quic_message_bytes_buffered{{{SEL}}}', "buffered bytes {{instance}}")], x=0)
ts("Certificate reloads", [(f'sum by (result) (increase(shoal_cert_reloads_total{{{SEL}}}[1h]))', "{{result}}")], x=12,
   desc="wrong_identity: a renewed certificate named another node and was refused.")
y += 8
ts("Days until certificate expiry",
   [(f'(shoal_cert_expiry_timestamp_seconds{{{SEL}}} - time()) / 86400', "{{instance}} {{cert}}")], unit="d", x=0, w=24,
   desc="From shoal_cert_expiry_timestamp_seconds (node, CA, operator certificates); nodes WARN under 30 days.")
y += 8

row("Gossip")
ts("Gossip messages", [(f'sum by (instance, direction) (rate(shoal_gossip_messages_total{{{SEL}}}[{R}]))', "{{instance}} {{direction}}")], unit="ops", x=0)
ts("Gossip bytes", [(f'sum by (instance, direction) (rate(shoal_gossip_bytes_total{{{SEL}}}[{R}]))', "{{instance}} {{direction}}")], unit="Bps", x=12)
y += 8
ts("Gossip refused by reason",
   [(f'sum by (reason) (rate(shoal_gossip_refused_total{{{SEL}}}[{R}]))', "{{reason}}"),
    (f'sum(rate(shoal_gossip_send_failures_total{{{SEL}}}[{R}]))', "send failures")],
   unit="ops", x=0, desc="Forged, replayed, unverified or oversized gossip, dropped before chitchat sees it.")
ts("Signature checks and verify cost",
   [(f'sum by (instance) (rate(shoal_gossip_signatures_checked_total{{{SEL}}}[{R}]))', "checked/s {{instance}}"),
    (f'sum by (instance) (rate(shoal_gossip_verify_seconds_total{{{SEL}}}[{R}]))', "CPU s/s {{instance}}")], x=12)
y += 8

row("Policy")
ts("Policy applied, refused, denied",
   [(f'sum(rate(shoal_policy_applied_total{{{SEL}}}[{R}]))', "applied"),
    (f'sum by (source, reason) (rate(shoal_policy_refused_total{{{SEL}}}[{R}]))', "refused {{source}} {{reason}}"),
    (f'sum(rate(shoal_policy_denied_total{{{SEL}}}[{R}]))', "requests denied")], unit="ops", x=0)
ts("Policy propagation p50 / p99 and conflicts",
   [(f'histogram_quantile(0.5, sum by (le) (rate(shoal_policy_propagation_seconds_bucket{{{SEL}}}[{R}])))', "p50 propagation"),
    (f'histogram_quantile(0.99, sum by (le) (rate(shoal_policy_propagation_seconds_bucket{{{SEL}}}[{R}])))', "p99 propagation"),
    (f'sum(increase(shoal_policy_conflicts_total{{{SEL}}}[1h]))', "conflicts (1h)"),
    (f'sum(increase(shoal_policy_hash_mismatches_total{{{SEL}}}[1h]))', "hash mismatches (1h)"),
    (f'sum(rate(shoal_policy_pulls_total{{{SEL}}}[{R}]))', "pulls/s")], x=12)
y += 8

row("Build")
global_pid = pid
panels.append({"type": "table", "title": "Versions", "id": pid,
               "datasource": {"type": "prometheus", "uid": "${datasource}"},
               "gridPos": {"h": 6, "w": 24, "x": 0, "y": y},
               "targets": [{"refId": "A", "expr": f'shoal_build_info{{{SEL}}}', "format": "table", "instant": True,
                            "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
               "options": {"showHeader": True}})

dash = {
    "title": "Shoal mesh",
    "uid": "shoal-mesh",
    "description": "Shoal service mesh: members, golden metrics per edge, QUIC/mTLS, gossip, policy. Metrics from each node's admin /metrics.",
    "tags": ["shoal", "service-mesh"],
    "timezone": "browser",
    "editable": True,
    "graphTooltip": 1,
    "schemaVersion": 39,
    "version": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1},
        {"name": "instance", "label": "Node", "type": "query",
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(shoal_build_info, instance)", "refId": "instance"},
         "definition": "label_values(shoal_build_info, instance)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "sort": 1, "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
print(json.dumps(dash, indent=2))
