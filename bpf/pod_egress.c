/* tc egress on the node-side end of each pod veth: packets the node sends into a pod.
 * The ingress programs steer plaintext from other pods (pod_ingress) and other nodes (uplink_ingress),
 * but a connection opened from the node itself (a host-network process) leaves through this veth and
 * never crosses either. A STRICT pod accepts no plaintext: a new connection to it that does not carry the
 * agent's socket mark (the agent's own connects after mTLS and authorization do) is dropped here, the
 * last hop before the pod, whatever its source. PERMISSIVE pods and established flows pass. */
#include "ambit_steer.h"

int pod_egress(struct __sk_buff *skb)
{
	struct ambit_packet pkt = {};
	if (!ambit_parse(skb, &pkt) || !pkt.pure_syn)
		return TC_ACT_OK;
	struct ambit_pod_key key = {.ip = pkt.tuple.ipv4.daddr};
	struct ambit_pod *pod = ambit_pods.lookup(&key);
	if (!pod || pod->mode != AMBIT_MODE_STRICT)
		return TC_ACT_OK;
	if (ambit_agent_marked(skb))
		return TC_ACT_OK;
	ambit_count(AMBIT_CTR_STRICT_UNMEDIATED_DROP);
	return TC_ACT_SHOT;
}
