/* The clock of a busy core: a chain of dependent adds runs one per cycle (the loop's own
   increment, compare and branch go to other ports). gcc -O1 -o /tmp/clock benchmarks/clock.c */
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b;
    unsigned long x = 0, n = 2000000000UL;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (unsigned long i = 0; i < n; i++) { __asm__ volatile("add $1, %0" : "+r"(x)); }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.2f GHz (loop of %lu dependent adds + loop overhead, %.3f s)\n", n / s / 1e9, n, s);
    return 0;
}
