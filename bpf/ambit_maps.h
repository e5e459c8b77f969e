/* Every map shared by ambit's BPF programs, declared once: agent/redirect/maps.py mirrors each layout.
 *
 * Maps are pinned under AMBIT_PIN_DIR (a bpffs directory, one per node agent): bcc reuses a pinned map
 * when one exists at the path and creates and pins it otherwise, so a restarted agent and the programs
 * still attached from its previous run share the same enrolment state.
 * Marks and ports (AMBIT_ROUTE_MARK, AMBIT_OUTBOUND_PORT, ...) come from agent/redirect/marks.py as -D flags.
 */
#ifndef AMBIT_MAPS_H
#define AMBIT_MAPS_H

#ifndef AMBIT_PIN_DIR
#error "AMBIT_PIN_DIR (the bpffs directory for the pins) must be defined"
#endif

#define AMBIT_MAX_PODS 16384
#define AMBIT_MAX_FLOWS 16384
#define AMBIT_WORKLOAD_LEN 120

/* How an enrolled pod's traffic is treated when the agent's listener is absent. */
enum ambit_mode {
	AMBIT_MODE_PERMISSIVE = 0, /* pass through in clear */
	AMBIT_MODE_STRICT = 1,     /* drop: fail closed */
};

/* Key of ambit_pods: the pod's IPv4 address in network byte order. */
struct ambit_pod_key {
	__be32 ip;
};

struct ambit_pod {
	__u32 mode;                         /* enum ambit_mode */
	__u32 flags;                        /* reserved, 0 */
	char workload[AMBIT_WORKLOAD_LEN];  /* workload uid "ns/name", NUL padded; for debugging only */
};

/* Key of ambit_captured: a connection as its SYN was captured (client side first), network byte order. */
struct ambit_flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

/* Index of ambit_counters (per-CPU packet counts, one per program path). Order is mirrored in maps.py. */
enum ambit_counter {
	AMBIT_CTR_POD_PACKETS = 0,         /* TCP/IPv4 packets seen on pod veths */
	AMBIT_CTR_UPLINK_PACKETS,          /* TCP/IPv4 packets to enrolled pods seen on the uplink */
	AMBIT_CTR_AGENT_MARK_PASS,         /* carried the agent's socket mark: never captured */
	AMBIT_CTR_SOCKET_ASSIGNED,         /* belonged to an existing agent socket (replies, captured flows) */
	AMBIT_CTR_NOT_ENROLLED_PASS,       /* from a pod that is not enrolled */
	AMBIT_CTR_ENROLLED_FLOW_PASS,      /* enrolled pod, no agent socket, not a SYN (flow older than enrolment) */
	AMBIT_CTR_OUTBOUND_CAPTURED,       /* SYN assigned to the outbound listener */
	AMBIT_CTR_OUTBOUND_STRICT_DROP,    /* SYN of a STRICT pod dropped: outbound listener absent */
	AMBIT_CTR_OUTBOUND_PERMISSIVE_PASS,/* SYN of a PERMISSIVE pod passed in clear: listener absent */
	AMBIT_CTR_OUTBOUND_ORPHAN_DROP,    /* STRICT pod, captured flow whose agent socket is gone: dropped */
	AMBIT_CTR_INBOUND_CAPTURED,        /* plaintext SYN to an enrolled pod assigned to the inbound listener */
	AMBIT_CTR_INBOUND_STRICT_DROP,     /* plaintext SYN to a STRICT pod dropped: inbound listener absent */
	AMBIT_CTR_INBOUND_PERMISSIVE_PASS, /* plaintext SYN to a PERMISSIVE pod passed: listener absent */
	AMBIT_CTR_ASSIGN_ERROR,            /* bpf_sk_assign failed: packet dropped */
	AMBIT_CTR_STRICT_UNMEDIATED_DROP,  /* SYN into a STRICT pod not made by the agent (e.g. from the node) */
	AMBIT_CTR_HBONE_CAPTURED,          /* SYN to an enrolled pod's HBONE port assigned to the HBONE listener */
	AMBIT_CTR_HBONE_NO_LISTENER_DROP,  /* SYN to an enrolled pod's HBONE port dropped: HBONE listener absent */
	AMBIT_CTR_MAX
};

BPF_TABLE_PINNED("hash", struct ambit_pod_key, struct ambit_pod, ambit_pods, AMBIT_MAX_PODS,
		 AMBIT_PIN_DIR "/pods", BPF_F_NO_PREALLOC);
/* Connections handed to a listener (value: the listener's port). When such a flow's agent socket is gone
 * (agent killed), its next packets are not a flow older than enrolment: a STRICT pod's are dropped. LRU:
 * an evicted entry only loses that check. */
BPF_TABLE_PINNED("lru_hash", struct ambit_flow_key, __u32, ambit_captured, AMBIT_MAX_FLOWS,
		 AMBIT_PIN_DIR "/captured");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, ambit_counters, AMBIT_CTR_MAX, AMBIT_PIN_DIR "/counters");

#endif
