/*
 * nfqdelay: hold every packet of an NFQUEUE for a fixed delay, then accept it.
 *
 * Usage: nfqdelay QUEUE DELAY_US
 *
 * The kernel here has no sch_netem, so bench/bench_wan.py emulates a WAN with an iptables
 * rule (-j NFQUEUE --queue-num QUEUE) on the INPUT chain of a network namespace's loopback:
 * each packet crosses INPUT once, so DELAY_US = RTT / 2. Packet ids and arrival times go into a
 * ring in arrival order (the kernel numbers a queue's packets in increasing order), and one
 * batched verdict accepts every packet up to the newest one that is DELAY_US old. Only packet
 * metadata is copied to user space. Prints "nfqdelay: ready" on stdout once bound; on
 * SIGTERM/SIGINT it accepts what it still holds, prints its counts on stderr and exits 0.
 * Build: cc -O2 -o nfqdelay nfqdelay.c -lnetfilter_queue -lnfnetlink
 */
#define _GNU_SOURCE /* ppoll */
#include <errno.h>
#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define RING (1u << 16) /* packets held at once; must stay above the queue's maxlen */

static uint32_t ring_id[RING];
static uint64_t ring_due[RING];
static unsigned head, tail; /* held packets are ring[tail .. head) */
static uint64_t delay_us, held_total, overflow_total;
static volatile sig_atomic_t stopping;

static uint64_t now_us(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa,
		     void *data) {
	(void)msg;
	(void)data;
	struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
	if (ph == NULL)
		return 0;
	uint32_t id = ntohl(ph->packet_id);
	if (head - tail >= RING) { /* never with maxlen < RING: let it through undelayed */
		overflow_total++;
		return nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
	}
	ring_id[head % RING] = id;
	ring_due[head % RING] = now_us() + delay_us;
	head++;
	held_total++;
	return 0;
}

/* Accept every held packet due by `now` with one verdict (ids up to the last due one). */
static void release(struct nfq_q_handle *qh, uint64_t now) {
	unsigned last = tail;
	while (last != head && ring_due[last % RING] <= now)
		last++;
	if (last == tail)
		return;
	nfq_set_verdict_batch(qh, ring_id[(last - 1) % RING], NF_ACCEPT);
	tail = last;
}

static void on_signal(int sig) {
	(void)sig;
	stopping = 1;
}

int main(int argc, char **argv) {
	if (argc != 3) {
		fprintf(stderr, "usage: %s QUEUE DELAY_US\n", argv[0]);
		return 2;
	}
	char *end;
	unsigned long queue = strtoul(argv[1], &end, 10);
	if (*end || queue > 65535) {
		fprintf(stderr, "nfqdelay: bad QUEUE %s\n", argv[1]);
		return 2;
	}
	delay_us = strtoull(argv[2], &end, 10);
	if (*end || delay_us > 10000000u) {
		fprintf(stderr, "nfqdelay: bad DELAY_US %s (0..10000000)\n", argv[2]);
		return 2;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	struct nfq_handle *h = nfq_open();
	if (h == NULL) {
		perror("nfqdelay: nfq_open");
		return 1;
	}
	struct nfq_q_handle *qh = nfq_create_queue(h, (uint16_t)queue, on_packet, NULL);
	if (qh == NULL) {
		perror("nfqdelay: nfq_create_queue (is another program bound to this queue?)");
		nfq_close(h);
		return 1;
	}
	if (nfq_set_mode(qh, NFQNL_COPY_META, 0) < 0 || nfq_set_queue_maxlen(qh, RING / 2) < 0) {
		perror("nfqdelay: nfq_set_mode/maxlen");
		return 1;
	}
	int fd = nfq_fd(h);
	int one = 1;
	/* a burst may outrun us: keep reading instead of failing on ENOBUFS */
	setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
	nfnl_rcvbufsiz(nfq_nfnlh(h), 16u << 20);
	printf("nfqdelay: ready (queue %lu, delay %llu us)\n", queue, (unsigned long long)delay_us);
	fflush(stdout);

	char buf[65536] __attribute__((aligned));
	while (!stopping) {
		uint64_t now = now_us();
		release(qh, now);
		struct timespec wait = {0, 0}, *waitp = NULL; /* NULL: nothing held, sleep */
		if (tail != head) {
			uint64_t due = ring_due[tail % RING], left = due > now ? due - now : 0;
			wait.tv_sec = (time_t)(left / 1000000u);
			wait.tv_nsec = (long)(left % 1000000u) * 1000;
			waitp = &wait;
		}
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		int n = ppoll(&pfd, 1, waitp, NULL);
		if (n < 0 && errno != EINTR) {
			perror("nfqdelay: ppoll");
			break;
		}
		if (n <= 0)
			continue;
		for (;;) { /* drain what is there, then release */
			ssize_t got = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
			if (got < 0)
				break;
			nfq_handle_packet(h, buf, (int)got);
		}
	}
	release(qh, UINT64_MAX);
	fprintf(stderr, "nfqdelay: held %llu packets, %llu let through undelayed (ring full)\n",
		(unsigned long long)held_total, (unsigned long long)overflow_total);
	nfq_destroy_queue(qh);
	nfq_close(h);
	return 0;
}
