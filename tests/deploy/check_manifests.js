// Checks rendered Kubernetes objects (kubectl kustomize output on stdin): selectors match the pod
// labels, every container has probes and resource requests, container ports match the flags the
// services listen on, Services select existing pods, the HPA targets the expert StatefulSet, and
// (gpu) expert/attention pods request GPUs, RDMA devices and hugepages; expert/attention pods give
// OpenBLAS as many threads as CPUs they request; every pod and container is locked down (non-root,
// read-only root filesystem, no privilege escalation, capabilities dropped, seccomp
// RuntimeDefault); draining pods (gateway, attention) get a grace period above preStop + their
// --drain-seconds, and the gateway a preStop sleep; NetworkPolicies let only the gateway reach attention nodes and only attention
// nodes reach shards; UCX's TCP port range is set and declared; the HPA's metric is the one the
// prometheus-adapter rule serves.
// Usage: kubectl kustomize OVERLAY | node check_manifests.js OVERLAY_NAME ADAPTER_VALUES_YAML
const yaml = require("js-yaml");
const input = require("fs").readFileSync(0, "utf8");
const objs = yaml.loadAll(input).filter(Boolean);
const overlay = process.argv[2];
const errors = [];
const fail = (m) => errors.push(m);
const byKind = (k) => objs.filter((o) => o.kind === k);
const workloads = [...byKind("Deployment"), ...byKind("StatefulSet")];
const matches = (sel, labels) => Object.entries(sel || {}).every(([k, v]) => (labels || {})[k] === v);
for (const w of workloads) {
  const name = `${w.kind}/${w.metadata.name}`;
  const tmpl = w.spec.template;
  if (!matches(w.spec.selector.matchLabels, tmpl.metadata.labels)) fail(`${name}: selector does not match its pod labels`);
  if (tmpl.metadata.labels["app.kubernetes.io/part-of"] !== "dmoe") fail(`${name}: pods lack app.kubernetes.io/part-of=dmoe (scraping keys on it)`);
  for (const c of tmpl.spec.containers) {
    const cn = `${name}/${c.name}`;
    if (!c.readinessProbe || !c.livenessProbe) fail(`${cn}: missing readiness or liveness probe`);
    // Liveness asks whether the process answers (grpc.health.v1 service "dmoe.liveness"),
    // readiness whether it can serve (service "": NOT_SERVING while draining or, on a gateway,
    // while no attention node is healthy). The same check for both would restart draining pods.
    for (const [kind, probe] of [["livenessProbe", c.livenessProbe], ["startupProbe", c.startupProbe]]) {
      if (probe && (!probe.grpc || probe.grpc.service !== "dmoe.liveness")) fail(`${cn}: ${kind} must be grpc service dmoe.liveness`);
    }
    if (c.readinessProbe && (!c.readinessProbe.grpc || (c.readinessProbe.grpc.service || "") !== "")) fail(`${cn}: readinessProbe must be grpc service ""`);
    if (!c.resources || !c.resources.requests || !c.resources.requests.cpu || !c.resources.requests.memory) fail(`${cn}: missing cpu/memory requests`);
    const args = [...(c.command || []), ...(c.args || [])].join(" ");
    const grpc = (c.ports || []).find((p) => p.name === "grpc");
    if (!grpc) { fail(`${cn}: no grpc port`); continue; }
    if (!new RegExp(`--grpc-listen[ =]0\\.0\\.0\\.0:${grpc.containerPort}\\b`).test(args)) fail(`${cn}: --grpc-listen does not match port ${grpc.containerPort}`);
    for (const probe of [c.readinessProbe, c.livenessProbe]) {
      if (probe && probe.grpc && probe.grpc.port !== grpc.containerPort) fail(`${cn}: probe port ${probe.grpc.port} != grpc port`);
    }
    const metrics = (c.ports || []).find((p) => p.name === "metrics");
    if (!metrics || !new RegExp(`--metrics-listen[ =]0\\.0\\.0\\.0:${metrics.containerPort}\\b`).test(args)) fail(`${cn}: metrics port/flag mismatch`);
    if (tmpl.metadata.annotations["prometheus.io/port"] !== String(metrics && metrics.containerPort)) fail(`${name}: prometheus.io/port annotation`);
    const httpPort = (c.ports || []).find((p) => p.name === "http");
    if (httpPort && !new RegExp(`--http-listen[ =]0\\.0\\.0\\.0:${httpPort.containerPort}\\b`).test(args)) fail(`${cn}: --http-listen does not match port ${httpPort.containerPort}`);
    const ucx = (c.ports || []).find((p) => p.name === "ucx");
    if (ucx && !new RegExp(`--ucx-listen[ =]0\\.0\\.0\\.0:${ucx.containerPort}\\b`).test(args)) fail(`${cn}: --ucx-listen does not match port ${ucx.containerPort}`);
    if (w.metadata.name === "dmoe-expert" || w.metadata.name === "dmoe-attention") {
      // OpenBLAS threads = the pod's CPU request (else one per node CPU, spinning on the others').
      const env = (c.env || []).find((e) => e.name === "BLAS_THREADS");
      const ref = env && env.valueFrom && env.valueFrom.resourceFieldRef;
      if (!ref || ref.resource !== "requests.cpu") fail(`${cn}: BLAS_THREADS is not the pod's requests.cpu`);
      if (!/--blas-threads[ =]"?\$BLAS_THREADS"?/.test(args)) fail(`${cn}: no --blas-threads "$BLAS_THREADS"`);
    }
    if (w.metadata.name === "dmoe-gateway" || w.metadata.name === "dmoe-attention") {
      // SIGTERM drains for --drain-seconds (default 30) after the preStop hook; the pod's grace
      // period must cover both, or requests in progress are SIGKILLed. The gateway waits in
      // preStop until the Service no longer sends it new connections.
      const m = args.match(/--drain-seconds[ =](\d+)/);
      const drain = m ? Number(m[1]) : 30;
      const pre = c.lifecycle && c.lifecycle.preStop;
      const sleep = pre && pre.exec && pre.exec.command.join(" ").match(/^sleep (\d+)$/);
      const preStop = pre ? (sleep ? Number(sleep[1]) : pre.sleep ? pre.sleep.seconds : NaN) : 0;
      if (Number.isNaN(preStop)) fail(`${cn}: preStop is neither "sleep N" nor a sleep action`);
      if (w.metadata.name === "dmoe-gateway" && !(preStop >= 3)) fail(`${cn}: no preStop sleep of 3 s or more (new connections while the endpoint is removed)`);
      const grace = tmpl.spec.terminationGracePeriodSeconds ?? 30;
      if (!(grace >= drain + preStop + 5)) fail(`${cn}: terminationGracePeriodSeconds ${grace} < preStop ${preStop} + --drain-seconds ${drain} + 5`);
    }
    if (w.metadata.name === "dmoe-expert" || w.metadata.name === "dmoe-attention") {
      if (!/--device[ =]"?\$DEVICE"?/.test(args)) fail(`${cn}: no --device "$DEVICE"`);
    }
    if (overlay === "gpu-rdma" && (w.metadata.name === "dmoe-expert" || w.metadata.name === "dmoe-attention")) {
      for (const r of ["nvidia.com/gpu", "rdma/rdma_shared_device_a", "hugepages-2Mi"]) {
        if (!c.resources.limits || !c.resources.limits[r]) fail(`${cn}: gpu-rdma needs a ${r} limit`);
      }
      // The GPU code is in the CUDA build only (deploy/docker/gpu.Dockerfile).
      if (!/^dmoe-gpu(:|$)/.test(c.image)) fail(`${cn}: gpu-rdma runs the dmoe-gpu image, not ${c.image}`);
    }
  }
  for (const v of tmpl.spec.volumes || []) {
    if (v.persistentVolumeClaim && !byKind("PersistentVolumeClaim").some((p) => p.metadata.name === v.persistentVolumeClaim.claimName)) fail(`${name}: PVC ${v.persistentVolumeClaim.claimName} is not defined`);
    if (v.secret && !byKind("Secret").some((s) => s.metadata.name === v.secret.secretName)) fail(`${name}: secret ${v.secret.secretName} is not defined`);
  }
  for (const c of tmpl.spec.containers) {
    for (const ef of c.envFrom || []) {
      if (ef.configMapRef && !byKind("ConfigMap").some((m) => m.metadata.name === ef.configMapRef.name)) fail(`${name}: configmap ${ef.configMapRef.name} is not defined`);
    }
  }
}
for (const s of byKind("Service")) {
  const pods = workloads.filter((w) => matches(s.spec.selector, w.spec.template.metadata.labels));
  if (pods.length === 0) fail(`Service/${s.metadata.name}: selects no pods`);
  for (const p of s.spec.ports) {
    const named = pods.some((w) => w.spec.template.spec.containers.some((c) => (c.ports || []).some((cp) => cp.name === p.targetPort)));
    if (!named) fail(`Service/${s.metadata.name}: targetPort ${p.targetPort} is not a container port`);
  }
}
for (const ss of byKind("StatefulSet")) {
  const svc = byKind("Service").find((s) => s.metadata.name === ss.spec.serviceName);
  if (!svc || svc.spec.clusterIP !== "None") fail(`StatefulSet/${ss.metadata.name}: needs a headless Service ${ss.spec.serviceName}`);
}
// Expert shards, attention nodes and gateways reach the router through its Service, with the
// cluster token.
const routerSvc = byKind("Service").find((s) => s.metadata.name === "dmoe-router");
for (const w of workloads.filter((w) => ["dmoe-expert", "dmoe-attention", "dmoe-gateway"].includes(w.metadata.name))) {
  for (const c of w.spec.template.spec.containers) {
    const args = [...(c.command || []), ...(c.args || [])].join(" ");
    const m = args.match(/--router[ =]([a-z0-9-]+):(\d+)/);
    if (!m) { fail(`${w.metadata.name}: no --router`); continue; }
    if (!routerSvc || m[1] !== "dmoe-router" || !routerSvc.spec.ports.some((p) => p.port === Number(m[2]))) fail(`${w.metadata.name}: --router ${m[1]}:${m[2]} is not the router Service`);
    if (!/--cluster-token-file[ =]\/secrets\/cluster-token/.test(args)) fail(`${w.metadata.name}: no cluster token`);
  }
}
// Lock-down of every pod and container (init containers too).
for (const w of workloads) {
  const name = `${w.kind}/${w.metadata.name}`;
  const pod = w.spec.template.spec;
  const psc = pod.securityContext || {};
  if (psc.runAsNonRoot !== true || !(psc.runAsUser > 0)) fail(`${name}: pods must run as a non-root user`);
  if (!psc.seccompProfile || psc.seccompProfile.type !== "RuntimeDefault") fail(`${name}: seccomp RuntimeDefault`);
  for (const c of [...(pod.initContainers || []), ...pod.containers]) {
    const sc = c.securityContext || {};
    if (sc.allowPrivilegeEscalation !== false) fail(`${name}/${c.name}: allowPrivilegeEscalation must be false`);
    if (sc.readOnlyRootFilesystem !== true) fail(`${name}/${c.name}: readOnlyRootFilesystem must be true`);
    if (!sc.capabilities || !(sc.capabilities.drop || []).includes("ALL")) fail(`${name}/${c.name}: capabilities must drop ALL`);
    const extra = (sc.capabilities && sc.capabilities.add) || [];
    if (extra.some((x) => x !== "IPC_LOCK") || (extra.length && overlay !== "gpu-rdma")) fail(`${name}/${c.name}: capabilities added: ${extra}`);
    if (sc.privileged) fail(`${name}/${c.name}: privileged`);
  }
}
// NetworkPolicies: default deny, then who reaches whom.
const policies = byKind("NetworkPolicy");
const policyFor = (app) => policies.filter((p) => matches(p.spec.podSelector.matchLabels, {app, "app.kubernetes.io/part-of": "dmoe"}));
if (!policies.some((p) => (p.spec.podSelector.matchLabels || {})["app.kubernetes.io/part-of"] === "dmoe" && !p.spec.ingress)) fail("no default-deny NetworkPolicy over the dmoe pods");
const allowedFrom = (app, port) => policyFor(app).flatMap((p) => (p.spec.ingress || []).filter((r) => !r.ports || r.ports.some((x) => x.port === port)).flatMap((r) => (r.from || [{any: true}])));
const onlyFrom = (app, port, from) => {
  const peers = allowedFrom(app, port);
  if (peers.length === 0) fail(`${app}: nothing may reach port ${port}`);
  for (const p of peers) {
    if (p.any || !p.podSelector || p.namespaceSelector || (p.podSelector.matchLabels || {}).app !== from) fail(`${app}: port ${port} is open to more than ${from}`);
  }
};
onlyFrom("dmoe-attention", "grpc", "dmoe-gateway");
onlyFrom("dmoe-expert", "grpc", "dmoe-attention");
onlyFrom("dmoe-expert", "ucx", "dmoe-attention");
onlyFrom("dmoe-expert", 13340, "dmoe-attention");
// UCX's TCP ports: a fixed range, declared on the shards' Service.
const cfg = byKind("ConfigMap").find((m) => m.metadata.name.startsWith("dmoe-config"));
const range = cfg && cfg.data && cfg.data.UCX_TCP_PORT_RANGE;
const rm = (range || "").match(/^(\d+)-(\d+)$/);
if (!rm) fail("dmoe-config: UCX_TCP_PORT_RANGE must be LO-HI");
// Where the shards and attention nodes compute: cuda only in the GPU overlay (and its image).
const device = cfg && cfg.data && cfg.data.DEVICE;
if (device !== (overlay === "gpu-rdma" ? "cuda" : "cpu")) fail(`dmoe-config: DEVICE is ${device} in ${overlay}`);
// Debian's UCX has no CUDA transports, and dmoe gives UCX host memory: none may be named.
if (/cuda/.test((cfg && cfg.data && cfg.data.UCX_TLS) || "")) fail("dmoe-config: UCX_TLS names a CUDA transport");
const expertSvc = byKind("Service").find((s) => s.metadata.name === "dmoe-expert");
for (let p = rm ? Number(rm[1]) : 0; rm && p <= Number(rm[2]); ++p) {
  if (!expertSvc || !expertSvc.spec.ports.some((x) => x.port === p)) fail(`Service/dmoe-expert: UCX port ${p} is not declared`);
}
// The secret holds both files.
const secret = byKind("Secret").find((s) => s.metadata.name.startsWith("dmoe-secrets"));
for (const k of ["api-keys", "cluster-token"]) {
  if (!secret || !secret.data || !secret.data[k]) fail(`Secret dmoe-secrets: no ${k}`);
}
const hpa = byKind("HorizontalPodAutoscaler");
if (hpa.length !== 1 || hpa[0].spec.scaleTargetRef.kind !== "StatefulSet" || hpa[0].spec.scaleTargetRef.name !== "dmoe-expert") fail("the HPA must target the dmoe-expert StatefulSet");
// The HPA scales on the metric the adapter rule serves, from a series the shards export.
const adapter = yaml.load(require("fs").readFileSync(process.argv[3], "utf8"));
const served = ((adapter.rules || {}).custom || []).map((r) => r.name && r.name.as);
for (const h of hpa) {
  for (const m of h.spec.metrics || []) {
    if (m.type === "Pods" && !served.includes(m.pods.metric.name)) fail(`HPA metric ${m.pods.metric.name} is not served by the prometheus-adapter rule`);
  }
}
// The adapter rule's series carry the labels it selects and maps to Kubernetes objects: the scrape
// configuration must set each (a rule whose labels no series has serves nothing, and the HPA never
// scales).
const scrape = byKind("ConfigMap").find((c) => c.metadata.name.startsWith("dmoe-prometheus-scrape"));
const scrapeCfg = scrape ? yaml.load(scrape.data["prometheus.yml"]) : {scrape_configs: []};
const setLabels = new Set(["__name__", "job", "instance"]);
for (const sc of scrapeCfg.scrape_configs || []) {
  for (const r of sc.relabel_configs || []) if (r.target_label) setLabels.add(r.target_label);
}
for (const r of (adapter.rules || {}).custom || []) {
  const inQuery = [...(r.seriesQuery || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:!=|=~|!~|=)/g)].map((m) => m[1]);
  const mapped = Object.keys((r.resources || {}).overrides || {});
  for (const l of [...inQuery, ...mapped]) {
    if (!setLabels.has(l)) fail(`prometheus-adapter rule ${r.name && r.name.as}: label "${l}" is not set by the scrape config (prometheus-scrape.yaml relabel_configs)`);
  }
}
const pdb = byKind("PodDisruptionBudget");
if (pdb.length !== 1 || !matches(pdb[0].spec.selector.matchLabels, (workloads.find((w) => w.metadata.name === "dmoe-expert") || {spec: {template: {metadata: {}}}}).spec.template.metadata.labels)) fail("the PDB must select the expert shards");
if (errors.length) {
  console.log(errors.join("\n"));
  process.exit(1);
}
console.log(`${overlay}: ${objs.length} objects, all checks pass`);
