/* tc ingress on the node-side end of each pod veth: packets leaving a pod.
 * Existing agent sockets first (replies to connections the agent opened towards this pod, and flows
 * it already captured, even after the pod is unenrolled); then new connections of enrolled pods go to
 * the outbound listener with their original destination, and new plaintext connections from other pods
 * to an enrolled pod go to the inbound plaintext listener (to its HBONE port: the HBONE listener). */
#include "ambit_steer.h"

int pod_ingress(struct __sk_buff *skb)
{
	struct ambit_packet pkt = {};
	if (!ambit_parse(skb, &pkt))
		return TC_ACT_OK;
	ambit_count(AMBIT_CTR_POD_PACKETS);
	if (ambit_agent_marked(skb))
		return TC_ACT_OK;
	int verdict = ambit_steer_established(skb, &pkt);
	if (verdict >= 0)
		return verdict;
	struct ambit_pod_key key = {.ip = pkt.tuple.ipv4.saddr};
	struct ambit_pod *pod = ambit_pods.lookup(&key);
	if (!pod) {
		/* Plaintext from a pod that is not enrolled to an enrolled pod on this node: the same
		 * inbound listener as plaintext from other nodes (the uplink program). */
		struct ambit_pod_key dst_key = {.ip = pkt.tuple.ipv4.daddr};
		struct ambit_pod *dst = pkt.pure_syn ? ambit_pods.lookup(&dst_key) : NULL;
		if (dst && ambit_is_hbone(&pkt))
			return ambit_steer_hbone(skb, &pkt);
		if (dst)
			return ambit_steer_to_listener(skb, &pkt, AMBIT_INBOUND_PLAINTEXT_PORT, dst->mode,
						       AMBIT_CTR_INBOUND_CAPTURED, AMBIT_CTR_INBOUND_STRICT_DROP,
						       AMBIT_CTR_INBOUND_PERMISSIVE_PASS);
		ambit_count(AMBIT_CTR_NOT_ENROLLED_PASS);
		return TC_ACT_OK;
	}
	if (!pkt.pure_syn) {
		/* No agent socket, yet the agent took this flow: the agent died with it. Fail closed. */
		struct ambit_flow_key flow = ambit_flow_of(&pkt);
		if (pod->mode == AMBIT_MODE_STRICT && ambit_captured.lookup(&flow)) {
			ambit_count(AMBIT_CTR_OUTBOUND_ORPHAN_DROP);
			return TC_ACT_SHOT;
		}
		ambit_count(AMBIT_CTR_ENROLLED_FLOW_PASS);
		return TC_ACT_OK;
	}
	return ambit_steer_to_listener(skb, &pkt, AMBIT_OUTBOUND_PORT, pod->mode,
				       AMBIT_CTR_OUTBOUND_CAPTURED, AMBIT_CTR_OUTBOUND_STRICT_DROP,
				       AMBIT_CTR_OUTBOUND_PERMISSIVE_PASS);
}
