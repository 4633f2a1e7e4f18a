// Validates PodMonitor and PrometheusRule manifests (JSON on stdin) with the
// @kubernetes-models/prometheus-operator models; prints one line per document.
const base = process.argv[2];
const { PodMonitor } = require(`${base}/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor`);
const { PrometheusRule } = require(`${base}/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule`);
const kinds = { PodMonitor, PrometheusRule };
let input = "";
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  let failed = false;
  for (const doc of JSON.parse(input)) {
    try {
      new kinds[doc.kind](doc).validate();
      console.log(`ok ${doc.kind} ${doc.metadata.name}`);
    } catch (e) {
      failed = true;
      console.log(`invalid ${doc.kind} ${doc.metadata.name}: ${e.message}`);
    }
  }
  process.exit(failed ? 1 : 0);
});
