#define _GNU_SOURCE
#include "exec.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "report.h"
#include "run.h"
#include "runcfg.h"
#include "runtime.h"
#include "util.h"

#define CHUNK 16384
#define IDLE_WAIT_US 100000 /* no host connected: look again after this */
#define SESSION_POLL_MS 50  /* a running process: check for its exit this often */
#define WRITE_WAIT_MS 1000
/* A hangup shorter than this may be one host leaving as the next arrives: the port's open
 * and close events reach the guest on a queue of their own, so the next host's bytes can
 * come before the news that the last host left, or that this one came. */
#define HOST_GRACE_MS 1000
#define HANGUP_POLL_MS 10

struct session {
	pid_t pid; /* 0: none */
	int in;    /* the process's stdin (pipe or pty master), -1 when closed */
	int out, err;
	int tty;
	char *pending; /* stdin bytes not written yet */
	size_t plen, poff;
};

static int g_port = -1;
static const struct config *g_cfg;
static unsigned char g_rx[FRAME_HEADER + MAX_FRAME];
static size_t g_rxlen;
static int g_host_away; /* a write gave up waiting for the host: the next ones do not wait */

/* Whether the port shows a host again (no hangup) within `ms`. */
static int host_back(int ms)
{
	for (int waited = 0;; waited += HANGUP_POLL_MS) {
		struct pollfd pf = {g_port, POLLIN, 0};
		if (poll(&pf, 1, 0) >= 0 && !(pf.revents & POLLHUP)) {
			g_host_away = 0;
			return 1;
		}
		if (waited >= ms)
			return 0;
		usleep(HANGUP_POLL_MS * 1000);
	}
}

/* Wait until the port may take more bytes: 0, or -1 when the host stays away. */
static int wait_writable(void)
{
	struct pollfd pf = {g_port, POLLOUT, 0};
	if (poll(&pf, 1, WRITE_WAIT_MS) < 0 && errno != EINTR)
		return -1;
	if (!(pf.revents & POLLHUP) || (pf.revents & POLLOUT))
		return 0;
	if (g_host_away || !host_back(HOST_GRACE_MS)) {
		g_host_away = 1;
		return -1;
	}
	return 0;
}

/* Write all of buf to the (non-blocking) port; -1 when the host went away. */
static int port_write(const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t w = write(g_port, p, len);
		if (w > 0) {
			p += w;
			len -= (size_t)w;
			continue;
		}
		if (w < 0 && errno != EAGAIN && errno != EINTR)
			return -1;
		if (wait_writable() < 0)
			return -1;
	}
	return 0;
}

static int send_frame(char type, const void *data, size_t len)
{
	unsigned char h[FRAME_HEADER] = {(unsigned char)type, (unsigned char)(len >> 24),
					 (unsigned char)(len >> 16), (unsigned char)(len >> 8),
					 (unsigned char)len};
	return port_write(h, sizeof h) < 0 || port_write(data, len) < 0 ? -1 : 0;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void end_session(struct session *s)
{
	if (s->pid > 0) {
		kill(-s->pid, SIGKILL);
		waitpid(s->pid, NULL, 0);
	}
	if (s->out == s->in)
		s->out = -1; /* a pty master, closed once */
	close_fd(&s->in);
	close_fd(&s->out);
	close_fd(&s->err);
	free(s->pending);
	*s = (struct session){0, -1, -1, -1, 0, NULL, 0, 0};
}

static void fail_child(const char *what, const char *arg, int code)
{
	char msg[512];
	snprintf(msg, sizeof msg, "vmimg exec: %s %s: %s\n", what, arg, strerror(errno));
	write_all(2, msg, strlen(msg));
	_exit(code);
}

/* In the child: the process's own session, its streams, user and directory. */
static void child(const struct runcfg *rc, const char *slave, int *fds)
{
	struct config cfg = *g_cfg;
	signals_reset();
	signal(SIGPIPE, SIG_DFL);
	setsid();
	if (slave) {
		int t = open(slave, O_RDWR);
		if (t < 0)
			fail_child("cannot open", slave, EXIT_AGENT_ERROR);
		ioctl(t, TIOCSCTTY, 0);
		fds[0] = fds[1] = fds[2] = t;
	}
	for (int i = 0; i < 3; i++)
		dup2(fds[i], i);
	if (slave && fds[0] > 2)
		close(fds[0]);
	char err[256];
	if (runcfg_apply(rc, &cfg) < 0 ||
	    (rc->user && apply_user(rc->user, &cfg, 0, err, sizeof err) < 0)) {
		errno = EINVAL;
		fail_child("bad request:", rc->user ? rc->user : "", EXIT_AGENT_ERROR);
	}
	gid_t groups[64];
	size_t ng = cfg.ngroups < 64 ? cfg.ngroups : 64;
	for (size_t i = 0; i < ng; i++)
		groups[i] = cfg.groups[i];
	if (setgroups(ng, groups) < 0 || setgid(cfg.gid) < 0 || setuid(cfg.uid) < 0)
		fail_child("cannot switch to the user", "", EXIT_AGENT_ERROR);
	if (chdir(cfg.cwd) < 0)
		fail_child("cannot enter", cfg.cwd, EXIT_AGENT_ERROR);
	errno = exec_search(cfg.argv, cfg.envp);
	fail_child("cannot execute", cfg.argv[0], errno == ENOENT ? EXIT_NOT_FOUND
								   : EXIT_NOT_EXECUTABLE);
}

/* Start the process an exec frame asks for; on failure the host gets an exit frame. */
static void start(struct session *s, char *text)
{
	struct runcfg rc;
	char err[256];
	int parsed = runcfg_parse(text, &rc, err, sizeof err);
	if (parsed == 0 && (!rc.argc || rc.nmounts || rc.nsecrets)) {
		snprintf(err, sizeof err, "an exec request has a command, and no mounts or secrets");
		runcfg_free(&rc);
		parsed = -1;
	}
	if (parsed < 0) {
		send_frame(FRAME_ERROR, err, strlen(err));
		return;
	}
	int fds[3] = {-1, -1, -1}, pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1};
	const char *slave = NULL;
	int master = -1;
	if (rc.tty == 1) {
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
		    !(slave = ptsname(master)))
			goto fail;
		if (rc.rows && rc.cols) {
			struct winsize ws = {.ws_row = (unsigned short)rc.rows,
					     .ws_col = (unsigned short)rc.cols};
			ioctl(master, TIOCSWINSZ, &ws);
		}
	} else {
		if (pipe2(pout, O_CLOEXEC) < 0 || pipe2(perr, O_CLOEXEC) < 0)
			goto fail;
		if (rc.stdin_open == 1 ? pipe2(pin, O_CLOEXEC) < 0
				       : (pin[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
			goto fail;
		fds[0] = pin[0];
		fds[1] = pout[1];
		fds[2] = perr[1];
	}
	pid_t pid = fork();
	if (pid == 0)
		child(&rc, slave, fds);
	if (pid < 0)
		goto fail;
	*s = (struct session){pid, master >= 0 ? master : pin[1], master >= 0 ? master : pout[0],
			      perr[0], master >= 0, NULL, 0, 0};
	close_fd(&pin[0]);
	close_fd(&pout[1]);
	close_fd(&perr[1]);
	runcfg_free(&rc);
	return;
fail:;
	const char *msg = "vmimg exec: cannot start the process\n";
	uint32_t code = EXIT_AGENT_ERROR;
	unsigned char c[4] = {0, 0, 0, (unsigned char)code};
	send_frame(FRAME_STDERR, msg, strlen(msg));
	send_frame(FRAME_EXIT, c, sizeof c);
	close_fd(&master);
	close_fd(&pin[0]);
	close_fd(&pin[1]);
	close_fd(&pout[0]);
	close_fd(&pout[1]);
	close_fd(&perr[0]);
	close_fd(&perr[1]);
	runcfg_free(&rc);
}

/* Read what the process wrote to fd into a frame of `type`; -1 at its end. */
static int relay_output(int *fd, char type)
{
	char buf[CHUNK];
	ssize_t n = read(*fd, buf, sizeof buf);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (n <= 0)
		return -1; /* EOF, or EIO from a pty master whose process is gone */
	return send_frame(type, buf, (size_t)n);
}

/* Everything still buffered from the process, then its exit code. */
static void finish(struct session *s, int status)
{
	int fds[2] = {s->out, s->err};
	const char types[2] = {FRAME_STDOUT, FRAME_STDERR};
	for (int i = 0; i < 2; i++) {
		if (fds[i] < 0)
			continue;
		fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK);
		char buf[CHUNK];
		ssize_t n;
		while ((n = read(fds[i], buf, sizeof buf)) > 0)
			send_frame(types[i], buf, (size_t)n);
	}
	uint32_t code = WIFEXITED(status)   ? (uint32_t)WEXITSTATUS(status)
			: WIFSIGNALED(status) ? (uint32_t)(EXIT_SIGNAL_BASE + WTERMSIG(status))
					      : EXIT_AGENT_ERROR;
	unsigned char c[4] = {(unsigned char)(code >> 24), (unsigned char)(code >> 16),
			      (unsigned char)(code >> 8), (unsigned char)code};
	send_frame(FRAME_EXIT, c, sizeof c);
	s->pid = 0; /* reaped: end_session must not wait for it */
	end_session(s);
}

/* One frame from the host. Returns -1 when the session is broken. */
static int handle(struct session *s, char type, unsigned char *data, size_t len)
{
	if (type == FRAME_HELLO)
		return 0; /* acted on when it arrived (resync) */
	if (type == FRAME_EXEC) {
		if (s->pid)
			return -1;
		char *text = malloc(len + 1);
		if (!text)
			return -1;
		memcpy(text, data, len);
		text[len] = '\0';
		start(s, text);
		free(text);
		return 0;
	}
	if (!s->pid)
		return 0; /* input for a process that has ended */
	if (type == FRAME_STDIN) {
		if (!len && !s->tty)
			close_fd(&s->in);
		if (!len || s->in < 0 || !(s->pending = malloc(len)))
			return 0;
		memcpy(s->pending, data, len);
		s->plen = len;
		s->poff = 0;
	} else if (type == FRAME_SIGNAL && len == 1 && data[0] > 0 && data[0] < 65) {
		kill(-s->pid, data[0]);
	} else if (type == FRAME_WINSIZE && len == 4 && s->tty) {
		struct winsize ws = {.ws_row = (unsigned short)(data[0] << 8 | data[1]),
				     .ws_col = (unsigned short)(data[2] << 8 | data[3])};
		ioctl(s->in, TIOCSWINSZ, &ws);
	}
	return 0;
}

/* Take the complete frames out of the receive buffer. */
static int drain_frames(struct session *s)
{
	while (g_rxlen >= FRAME_HEADER && !s->pending) {
		size_t len = (size_t)g_rx[1] << 24 | (size_t)g_rx[2] << 16 | (size_t)g_rx[3] << 8 |
			     g_rx[4];
		if (len > MAX_FRAME)
			return -1;
		if (g_rxlen < FRAME_HEADER + len)
			break;
		if (handle(s, (char)g_rx[0], g_rx + FRAME_HEADER, len) < 0)
			return -1;
		g_rxlen -= FRAME_HEADER + len;
		memmove(g_rx, g_rx + FRAME_HEADER + len, g_rxlen);
	}
	return 0;
}

static void write_pending(struct session *s)
{
	ssize_t w = write(s->in, s->pending + s->poff, s->plen - s->poff);
	if (w < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (w < 0) {
		close_fd(&s->in); /* the process closed its stdin: drop the rest */
		s->poff = s->plen;
	} else {
		s->poff += (size_t)w;
	}
	if (s->poff == s->plen) {
		free(s->pending);
		s->pending = NULL;
	}
}

/* A hello in what arrived: a new host. Drop what came before the last one and
 * end the old host's session. Returns whether there was one. */
static int resync(struct session *s)
{
	unsigned char *last = NULL;
	for (unsigned char *p = g_rx; (p = memmem(p, g_rxlen - (size_t)(p - g_rx), HELLO, HELLO_LEN));
	     p++)
		last = p;
	if (!last)
		return 0;
	end_session(s);
	g_rxlen -= (size_t)(last - g_rx);
	memmove(g_rx, last, g_rxlen);
	return 1;
}

/* Read what the host sent: 1 when bytes came, 0 when the host hung up, -1 when none are
 * there yet. A full buffer (a broken stream) keeps only its end, where a hello may be
 * starting. (A port whose host hung up reads as at its end, and polls as readable too.) */
static int receive(void)
{
	if (g_rxlen == sizeof g_rx) {
		memmove(g_rx, g_rx + g_rxlen - (HELLO_LEN - 1), HELLO_LEN - 1);
		g_rxlen = HELLO_LEN - 1;
	}
	ssize_t r = read(g_port, g_rx + g_rxlen, sizeof g_rx - g_rxlen);
	if (r <= 0)
		return r == 0 ? 0 : -1;
	g_rxlen += (size_t)r;
	g_host_away = 0;
	return 1;
}

/* The host hung up. Returns whether it is back within the grace: a new host whose hello is
 * here or on its way, or one whose session began before this hangup arrived (the hangup
 * was the last host's); either way the hello decides. Otherwise its process is ended and
 * what it sent dropped. */
static int hung_up(struct session *s, int *broken)
{
	if ((s->pid || g_rxlen) && host_back(HOST_GRACE_MS))
		return 1;
	end_session(s);
	g_rxlen = 0;
	*broken = 0;
	return 0;
}

static void serve(void)
{
	struct session s = {0, -1, -1, -1, 0, NULL, 0, 0};
	int broken = 0; /* a bad frame: ignore the host until it goes */
	for (;;) {
		struct pollfd p[4] = {{g_port, (short)(s.pending ? 0 : POLLIN), 0}};
		int n = 1, iout = -1, ierr = -1, iin = -1;
		if (s.out >= 0)
			p[iout = n++] = (struct pollfd){s.out, POLLIN, 0};
		if (s.err >= 0)
			p[ierr = n++] = (struct pollfd){s.err, POLLIN, 0};
		if (s.pending && s.in >= 0)
			p[iin = n++] = (struct pollfd){s.in, POLLOUT, 0};
		poll(p, (nfds_t)n, s.pid ? SESSION_POLL_MS : -1);
		/* With stdin pending the host's bytes wait in the port, and a hangup is all
		 * there is to see. */
		int got = -1;
		if (!s.pending && (p[0].revents & (POLLIN | POLLHUP)))
			got = receive();
		else if (s.pending && (p[0].revents & POLLHUP))
			got = 0;
		if (got == 0 && !hung_up(&s, &broken)) {
			usleep(IDLE_WAIT_US); /* no host: the port polls readable until one comes */
			continue;
		}
		if (got > 0 && resync(&s))
			broken = 0;
		if (!broken && drain_frames(&s) < 0) {
			const char *why = "bad frame";
			send_frame(FRAME_ERROR, why, strlen(why));
			end_session(&s);
			broken = 1; /* until the next hello */
		}
		if (iin >= 0 && (p[iin].revents & (POLLOUT | POLLERR | POLLHUP)))
			write_pending(&s);
		if (iout >= 0 && (p[iout].revents & (POLLIN | POLLHUP | POLLERR)) &&
		    relay_output(&s.out, FRAME_STDOUT) < 0) {
			if (s.out == s.in)
				s.out = -1; /* a pty master: still the input, closed at the end */
			else
				close_fd(&s.out);
		}
		if (ierr >= 0 && (p[ierr].revents & (POLLIN | POLLHUP | POLLERR)) &&
		    relay_output(&s.err, FRAME_STDERR) < 0)
			close_fd(&s.err);
		int status;
		if (s.pid && waitpid(s.pid, &status, WNOHANG) == s.pid)
			finish(&s, status);
	}
}

void exec_server_start(const struct config *cfg)
{
	char path[300];
	if (find_device(VIRTIO_PORTS_DIR, "", "name", EXEC_PORT_NAME, path, sizeof path) < 0)
		return;
	pid_t pid = fork();
	if (pid != 0)
		return; /* the agent (or a failed fork: exec is not essential) */
	prctl(PR_SET_NAME, "vmimg-exec");
	signals_reset();
	signal(SIGPIPE, SIG_IGN); /* a process that closed its stdin must not end the server */
	g_cfg = cfg;
	g_port = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
	if (g_port < 0) {
		log_msg("cannot open %s: %s", path, strerror(errno));
		_exit(1);
	}
	serve();
}
