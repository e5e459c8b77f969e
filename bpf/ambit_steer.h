/* Packet parsing and socket steering shared by the tc programs (one .c file per hook includes this).
 *
 * Steering = bpf_sk_assign() of a local socket at tc ingress plus AMBIT_ROUTE_MARK on the packet: the
 * fwmark rule sends marked packets to a table whose only route is `local 0.0.0.0/0 dev lo`, so a packet
 * whose destination is another host is still delivered locally, to the assigned socket (the kernel drops
 * an assigned packet that routing would forward). Listeners must be IP_TRANSPARENT to answer for
 * addresses the node does not own.
 */
#ifndef AMBIT_STEER_H
#define AMBIT_STEER_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#include "ambit_maps.h"

#ifndef BPF_F_CURRENT_NETNS
#define BPF_F_CURRENT_NETNS (-1L)
#endif

struct ambit_packet {
	struct bpf_sock_tuple tuple; /* ipv4 member: addresses and ports in network byte order */
	int pure_syn;                /* SYN without ACK: the first packet of a new connection */
};

static __always_inline void ambit_count(__u32 index)
{
	__u64 *value = ambit_counters.lookup(&index);
	if (value)
		*value += 1;
}

/* Fills pkt from an Ethernet/IPv4/TCP packet; returns 0 for anything else (passed untouched). */
static __always_inline int ambit_parse(struct __sk_buff *skb, struct ambit_packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP || ip->ihl < 5)
		return 0;
	/* Non-first fragments carry no TCP header. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > data_end)
		return 0;
	pkt->tuple.ipv4.saddr = ip->saddr;
	pkt->tuple.ipv4.daddr = ip->daddr;
	pkt->tuple.ipv4.sport = tcp->source;
	pkt->tuple.ipv4.dport = tcp->dest;
	pkt->pure_syn = tcp->syn && !tcp->ack;
	return 1;
}

static __always_inline struct ambit_flow_key ambit_flow_of(struct ambit_packet *pkt)
{
	struct ambit_flow_key flow = {
		.saddr = pkt->tuple.ipv4.saddr,
		.daddr = pkt->tuple.ipv4.daddr,
		.sport = pkt->tuple.ipv4.sport,
		.dport = pkt->tuple.ipv4.dport,
	};
	return flow;
}

static __always_inline int ambit_agent_marked(struct __sk_buff *skb)
{
	if ((skb->mark & AMBIT_AGENT_SOCKET_MARK) != AMBIT_AGENT_SOCKET_MARK)
		return 0;
	ambit_count(AMBIT_CTR_AGENT_MARK_PASS);
	return 1;
}

static __always_inline int ambit_assign(struct __sk_buff *skb, struct bpf_sock *sk, __u32 counter)
{
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		ambit_count(AMBIT_CTR_ASSIGN_ERROR);
		return TC_ACT_SHOT;
	}
	skb->mark = (skb->mark & ~AMBIT_ROUTE_MASK) | AMBIT_ROUTE_MARK;
	ambit_count(counter);
	return TC_ACT_OK;
}

/* Step 1 for every packet: if it belongs to an existing non-listening local socket (an agent
 * connection, or a reply to a connection the agent opened with a pod's address), deliver it there.
 * Returns a tc verdict, or -1 when no such socket exists. */
static __always_inline int ambit_steer_established(struct __sk_buff *skb, struct ambit_packet *pkt)
{
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &pkt->tuple, sizeof(pkt->tuple.ipv4),
						 BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	/* A wildcard listener of the node matches any destination: not ours to take. */
	if (sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -1;
	}
	return ambit_assign(skb, sk, AMBIT_CTR_SOCKET_ASSIGNED);
}

/* Step 2 for a new connection of an enrolled pod: hand the SYN to the agent's listener on `port`
 * (bound to the wildcard address, so looking it up with the original destination finds it); the
 * accepted socket's local address is the original destination. Without a listener, the pod's mode
 * decides: STRICT drops, PERMISSIVE passes in clear. */
static __always_inline int ambit_steer_to_listener(struct __sk_buff *skb, struct ambit_packet *pkt,
						   __u16 port, __u32 mode, __u32 captured,
						   __u32 strict_drop, __u32 permissive_pass)
{
	struct bpf_sock_tuple listener = pkt->tuple;
	listener.ipv4.dport = bpf_htons(port);
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &listener, sizeof(listener.ipv4),
						 BPF_F_CURRENT_NETNS, 0);
	if (sk && sk->state == BPF_TCP_LISTEN) {
		int verdict = ambit_assign(skb, sk, captured);
		if (verdict == TC_ACT_OK) {
			struct ambit_flow_key flow = ambit_flow_of(pkt);
			__u32 listener_port = port;
			ambit_captured.update(&flow, &listener_port);
		}
		return verdict;
	}
	if (sk)
		bpf_sk_release(sk);
	if (mode == AMBIT_MODE_STRICT) {
		ambit_count(strict_drop);
		return TC_ACT_SHOT;
	}
	ambit_count(permissive_pass);
	return TC_ACT_OK;
}

/* A new connection to an enrolled pod's HBONE port: how ztunnel (and ambit) dial a pod. It goes to the
 * agent's HBONE listener, which serves it as mTLS presenting that pod's identity, and never to the
 * plaintext listener or the pod itself: without the HBONE listener it is dropped whatever the pod's mode
 * (HBONE bytes are never handed to the pod's own port). */
static __always_inline int ambit_steer_hbone(struct __sk_buff *skb, struct ambit_packet *pkt)
{
	return ambit_steer_to_listener(skb, pkt, AMBIT_HBONE_PORT, AMBIT_MODE_STRICT, AMBIT_CTR_HBONE_CAPTURED,
				       AMBIT_CTR_HBONE_NO_LISTENER_DROP, AMBIT_CTR_HBONE_NO_LISTENER_DROP);
}

static __always_inline int ambit_is_hbone(struct ambit_packet *pkt)
{
	return pkt->tuple.ipv4.dport == bpf_htons(AMBIT_HBONE_PORT);
}

#endif
