/* tc ingress on the node's uplink (the interface holding the node IP): packets from other nodes.
 * Only packets addressed to an enrolled pod are looked at. Mesh traffic is addressed to the pod itself
 * (`<pod ip>:15008`, as ztunnel dials it): a new connection to that port goes to the agent's HBONE
 * listener. Any other new connection to an enrolled pod is plaintext and goes to the inbound plaintext
 * listener, so policy (e.g. STRICT mTLS) applies to it; later packets of those connections and replies
 * to agent connections that used a pod's address (its HBONE from the source pod's IP included) go to
 * their socket. */
#include "ambit_steer.h"

int uplink_ingress(struct __sk_buff *skb)
{
	struct ambit_packet pkt = {};
	if (!ambit_parse(skb, &pkt))
		return TC_ACT_OK;
	struct ambit_pod_key key = {.ip = pkt.tuple.ipv4.daddr};
	struct ambit_pod *pod = ambit_pods.lookup(&key);
	if (!pod)
		return TC_ACT_OK;
	ambit_count(AMBIT_CTR_UPLINK_PACKETS);
	if (ambit_agent_marked(skb))
		return TC_ACT_OK;
	int verdict = ambit_steer_established(skb, &pkt);
	if (verdict >= 0)
		return verdict;
	if (!pkt.pure_syn) {
		ambit_count(AMBIT_CTR_ENROLLED_FLOW_PASS);
		return TC_ACT_OK;
	}
	if (ambit_is_hbone(&pkt))
		return ambit_steer_hbone(skb, &pkt);
	return ambit_steer_to_listener(skb, &pkt, AMBIT_INBOUND_PLAINTEXT_PORT, pod->mode,
				       AMBIT_CTR_INBOUND_CAPTURED, AMBIT_CTR_INBOUND_STRICT_DROP,
				       AMBIT_CTR_INBOUND_PERMISSIVE_PASS);
}
